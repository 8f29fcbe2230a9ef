"""Flower's simulation engine without Ray: every virtual client runs in this process.

When every virtual client gets all the host's cores (one at a time, as pfl-research
trains its users), Ray buys nothing and costs a lot on a small host: starting Ray (~3 s
here), a worker process that imports torch, transformers, peft and Opacus again and loads
a second base model (~5 s), pickling every message both ways, and shutting Ray down
(~1.5 s). `InProcessBackend` runs the same ClientApp in the simulation's own process,
through the rest of Flower's engine unchanged: the ServerApp and its `Grid`, the
SuperLink's in-memory state, the engine's message queues and its worker loop
(`flwr.server.superlink.fleet.vce.vce_api.run_api`), one `Message` per virtual node.

Flower 1.41's `start_vce` names its Ray backend directly rather than looking one up by
`backend_name`, so `in_process_engine()` puts this backend in that place for the duration
of one `run_simulation` call and restores it after (a test checks that a simulation under
it starts no Ray and runs its clients in this process). The `Backend` interface is
Flower's own (`flwr.server.superlink.fleet.vce.backend.Backend`).

Every torch call of the run happens on the engine's compute threads (`ComputeSlots`): the
clients' training and the server's central evaluation. PyTorch's OpenMP runtime keeps a team
of threads per calling thread, and GNU OpenMP throttles its spin-waiting as soon as a process
holds more OpenMP threads than cores; with the evaluation on the ServerApp's thread, every
client after the first round trained about 30% slower on this 2-core host (measured:
`benchmarks/pfl_compare.py`, rounds 2+ against round 1).

Several clients at once, on one device. With K slots, K virtual clients train concurrently
in this process: each slot is one thread with its own model and tokenizer
(`fedtune.training.model_cache.model_slot`: two clients never share adapter tensors) and,
on a GPU, its own CUDA stream, so one client's kernels overlap another's data preparation,
optimizer step and host-side bookkeeping; a small LoRA client leaves most of a GPU idle
alone. The engine chooses K (`simulations.run.clients_at_once`): 1 / the GPU share per
client on a host with one GPU (four at the default share), the CPUs over the CPUs per
client when asked for on a CPU (then each slot's torch calls get their share of the cores).
Privacy randomness never depends on which slot or in what order clients run: each training
call draws its Poisson batches and noise from generators of its own (`fedtune.privacy.
randomness`); only dropout, where a model has it on, draws from torch's process-wide
generator, whose order concurrent clients share.

Isolation between virtual clients is what it is under Ray's workers: one process serves
them, each with its own state dir and ledger; arrays cross the message boundary serialised
(`flwr.app.Array` holds bytes), so neither side can alias the other's tensors.
"""

from __future__ import annotations

import copy

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from queue import Queue
from typing import Callable, Iterator, TypeVar

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from fedtune.training.model_cache import model_slot

T = TypeVar("T")


def _set_torch_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


class ComputeSlots:
    """K threads, one per slot, that run the simulation's model work: a call waits for a
    free slot and runs there, under that slot's model (and CUDA stream, on a GPU)."""

    def __init__(self, slots: int = 1, torch_threads: int | None = None) -> None:
        if slots < 1:
            raise ValueError(f"compute slots: {slots}, expected at least 1")
        self.slots = slots
        # OpenMP's thread count is each calling thread's own setting: set it in every slot's
        # thread, or a slot created before (or after) the process-wide change keeps its own
        # count, and a client's float results depend on the slot it landed in
        initializer = None if torch_threads is None else partial(_set_torch_threads, torch_threads)
        self._threads = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fedtune-compute-{k}",
                                            initializer=initializer) for k in range(slots)]
        self._free: Queue[int] = Queue()
        for k in range(slots):
            self._free.put(k)
        self._streams = self._cuda_streams(slots)

    @staticmethod
    def _cuda_streams(slots: int) -> list | None:
        import torch

        if slots < 2 or not torch.cuda.is_available():
            return None
        return [torch.cuda.Stream() for _ in range(slots)]

    def _run(self, slot: int, work: Callable[[], T]) -> T:
        with model_slot(slot):
            if self._streams is None:
                return work()
            import torch

            stream = self._streams[slot]
            with torch.cuda.stream(stream):
                result = work()
            stream.synchronize()  # the reply leaves this slot with its tensors computed
            return result

    def __call__(self, work: Callable[[], T]) -> T:
        slot = self._free.get()
        try:
            return self._threads[slot].submit(self._run, slot, work).result()
        finally:
            self._free.put(slot)

    def close(self) -> None:
        for thread in self._threads:
            thread.shutdown(wait=True)


_COMPUTE: list[ComputeSlots] = []  # the running in-process engine's slots (one engine at a time)


class ClientAppError(Exception):
    """A ClientApp raised: Flower's engine turns it into an error reply, as under Ray."""


class InProcessBackend(Backend):
    """One worker per compute slot: the engine hands each a message, it runs the ClientApp
    here and now, in a free slot."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.app_fn: Callable[[], ClientApp] | None = None
        self.slots = _COMPUTE[-1].slots if _COMPUTE else 1

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return self.slots

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self.app_fn = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.app_fn is None:
            raise ValueError("InProcessBackend: build() was not called")
        app = self.app_fn()
        # Each node gets its own copy, as it would from the wire: Flower's SecAgg+ workflow
        # sends every node one shared ConfigRecord, and its mod pops the stage from it.
        message = copy.deepcopy(message)
        try:
            return _COMPUTE[-1](lambda: app(message=message, context=context)), context
        except Exception as exc:  # what Ray's actor does: the engine replies with an error
            raise ClientAppError(f"{type(exc).__name__}: {exc}") from exc


@contextmanager
def in_process_engine(slots: int = 1) -> Iterator[ComputeSlots]:
    """Within this block, Flower's simulation engine builds `InProcessBackend` where it
    would build its Ray backend, with `slots` clients at once. Yields the compute slots, for
    the server's own model work. On a CPU, each slot's torch calls get their share of the
    cores for the block (torch's thread count is the process's)."""
    import torch
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original, threads = raybackend.RayBackend, torch.get_num_threads()
    raybackend.RayBackend = InProcessBackend
    share = max(1, threads // slots) if slots > 1 and not torch.cuda.is_available() else None
    compute = ComputeSlots(slots, torch_threads=share)
    _COMPUTE.append(compute)
    try:
        yield compute
    finally:
        raybackend.RayBackend = original
        _COMPUTE.remove(compute)
        compute.close()
