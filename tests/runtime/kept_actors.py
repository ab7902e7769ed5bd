"""Ray actors that outlive a run, for test modules whose Ray runs can share them (`KeptActors`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from raypfl.runtime.parameter_server import ParameterServer
from raypfl.runtime.ray_runtime import RayRuntime
from raypfl.runtime.worker import ClientWorker


@dataclass
class Kept:
    """The Ray actors a module's Ray runs share (see `KeptActors`)."""

    clients: list = field(default_factory=list)
    server: object = None

    def kill(self, ray) -> None:
        for actor in [*self.clients, *([self.server] if self.server is not None else [])]:
            ray.kill(actor, no_restart=True)
        self.clients, self.server = [], None


def use_kept(monkeypatch, kept: Kept) -> None:
    """Runs of the calling test build their Ray runtime on `kept`'s actors."""
    import raypfl.driver.experiment

    monkeypatch.setattr(raypfl.driver.experiment, "build_runtime", lambda spec: KeptActors(spec, kept))


class KeptActors(RayRuntime):
    """A RayRuntime whose actors outlive it: the next run's runtime re-initialises them in place, each
    with its own constructor and the new run's arguments (`ClientWorker.__init__` with the new setup,
    `ParameterServer.__init__` with the new broadcast, server update, state and finalizer), instead of
    starting new processes. Here a client actor costs 5-15 s (a process importing torch, then torch._dynamo
    on its first optimizer step) and the parameter-server actor ~2 s, a run's three rounds ~0.3 s. With
    nothing kept yet it starts its actors as a RayRuntime does (tests/runtime/test_runtimes.py's first Ray
    run: fresh actors). `wait_for_actors`: `ready()` waits for the actors (a deterministic warm start).

    Kept actors keep their CPUs: on the session's 2-CPU Ray a run that starts its own actors while two
    are kept would wait for them forever, so such a run calls `Kept.kill` first."""

    def __init__(self, spec, kept: Kept, wait_for_actors: bool = False):
        super().__init__(spec)
        self.kept = kept
        self.wait_for_actors = wait_for_actors

    def new_actor(self):
        if not self.kept.clients:
            return super().new_actor()
        actor = self.kept.clients.pop(0)
        actor.__ray_call__.remote(ClientWorker.__init__, self._setup_ref, self.spec.rebuild_model)
        return actor

    def new_server(self, broadcast_ref, version: int) -> None:
        if self.kept.server is None:
            super().new_server(broadcast_ref, version)
            return
        self.server, self.kept.server = self.kept.server, None
        update, state = self.setup.algorithm.server_update, self.state_ref(version)
        self.server.__ray_call__.remote(
            ParameterServer.__init__,
            broadcast_ref,
            update,
            self.keep_versions,
            version,
            state,
            self.setup.finalize,
        )

    def ready(self) -> bool:
        while self.wait_for_actors and not super().ready():
            time.sleep(0.02)
        return super().ready()

    def close(self) -> None:
        self.kept.clients.extend(self.actors)
        self.kept.server = self.server
        self.actors, self.server = [], None
        super().close()
