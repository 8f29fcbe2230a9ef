"""The host, not the learning: crash-safe file writes, quieting known-harmless library
chatter, describing the machine a measurement ran on and the memory a run holds, finding
the Flower executables, and development TLS certificates.

May import: `fedtune.errors` and the standard library only. Every other package may use it.

    atomic        write-temp, fsync, rename: a reader sees the old file or the new one
    quiet         filters for warnings known to be harmless, unless --verbose
    machine       CPU, cores, GPU and library versions of the machine a number came from
    memory        resident memory of this process and its workers, recorded each round
    processes     where the SuperLink / SuperNode executables are, without importing Flower
    certificates  development certificates and node keys for a TLS deployment
"""
