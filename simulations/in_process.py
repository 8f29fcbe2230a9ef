"""Flower's simulation engine without Ray, for a simulation that needs one worker.

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

Every torch call of the run happens on one thread (`ComputeThread`): the clients' training
and the server's central evaluation. PyTorch's OpenMP runtime keeps a team of threads per
calling thread, and GNU OpenMP throttles its spin-waiting as soon as a process holds more
OpenMP threads than cores; with the evaluation on the ServerApp's thread, every client
after the first round trained about 30% slower on this 2-core host (measured:
`benchmarks/pfl_compare.py`, rounds 2+ against round 1).

Isolation between virtual clients is what it is under Ray's single worker: one process
serves them in turn, each with its own state dir and ledger; arrays cross the message
boundary serialised (`flwr.app.Array` holds bytes), so neither side can alias the other's
tensors.
"""

from __future__ import annotations

import copy

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

T = TypeVar("T")


class ComputeThread:
    """One thread that runs the simulation's model work, in the order it is handed in."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedtune-compute")

    def __call__(self, work: Callable[[], T]) -> T:
        return self._executor.submit(work).result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


_COMPUTE: list[ComputeThread] = []  # the running in-process engine's thread (one at a time)


class ClientAppError(Exception):
    """A ClientApp raised: Flower's engine turns it into an error reply, as under Ray."""


class InProcessBackend(Backend):
    """One worker: the engine hands it a message, it runs the ClientApp here and now."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self.app_fn: Callable[[], ClientApp] | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

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
def in_process_engine() -> Iterator[ComputeThread]:
    """Within this block, Flower's simulation engine builds `InProcessBackend` where it
    would build its Ray backend. Yields the compute thread, for the server's own model work."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    raybackend.RayBackend = InProcessBackend
    compute = ComputeThread()
    _COMPUTE.append(compute)
    try:
        yield compute
    finally:
        raybackend.RayBackend = original
        _COMPUTE.remove(compute)
        compute.close()
