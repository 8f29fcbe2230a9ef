"""The server's side of a federation, independent of Flower: which nodes train (cohorts
drawn the way user-level DP accounts for them), how replies combine (aggregators, the
user-level DP step, server optimizers), the server state a restart resumes from
(checkpoints) and central evaluation of each new global adapter.

May import: `fedtune.training`, `fedtune.privacy`, `fedtune.models`, `fedtune.data`,
`fedtune.system`, `fedtune.config`, `fedtune.errors`. `aggregate` and `server_optimizers`
are read by config validation and never import `fedtune.config`.

    strategy           the round logic: cohort, what travels, how replies combine
    aggregate          weighted means, robust aggregators, clipping, the DP noise of a round
    server_optimizers  FedAvg, FedAdam, FedYogi: one entry each in the registry
    cohort             which nodes train, from secret randomness
    server             `FederationServer`: global adapter, rounds, resumable state
    checkpoint         one safetensors file per federation, replaced atomically
    central_eval       the server's own held-out evaluation of each global adapter, and of
                       an instruct run's initial one (the zero-shot baseline)
"""
