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

Isolation between virtual clients is what it is under Ray's single worker: one process
serves them in turn, each with its own state dir and ledger; arrays cross the message
boundary serialised (`flwr.app.Array` holds bytes), so neither side can alias the other's
tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig


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
        try:
            return self.app_fn()(message=message, context=context), context
        except Exception as exc:  # what Ray's actor does: the engine replies with an error
            raise ClientAppError(f"{type(exc).__name__}: {exc}") from exc


@contextmanager
def in_process_engine() -> Iterator[None]:
    """Within this block, Flower's simulation engine builds `InProcessBackend` where it
    would build its Ray backend."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    raybackend.RayBackend = InProcessBackend
    try:
        yield
    finally:
        raybackend.RayBackend = original
