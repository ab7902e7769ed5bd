"""The MPI runtime: the same worker and parameter-server code, over mpi4py ranks.

Every rank runs the same command under `mpiexec -n N`. Rank 0 is the driver and the server and also trains
its share of the cohort; the other ranks serve its commands. Per round (mode `server`): rank 0 broadcasts
the algorithm's broadcast (one `Bcast` per named array), every rank trains its clients into ONE weighted
partial sum per named statistic, the partials are gathered on rank 0 (one `Gather` of float64 buffers per
statistic, summed in rank order) and rank 0's parameter server applies the algorithm's server update,
keeping its server state. Mode `allgather` has no server rank: every rank
gathers every partial (`Allgather`) and applies the server update itself, and after each round all
replicas are checked to be bit-identical.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays, Stacked
from raypfl.algorithms.base import ServerSnapshot
from raypfl.config import RuntimeSpec
from raypfl.errors import ConfigError
from raypfl.runtime.base import Evaluation, RoundPlan, RoundResult, combine_evaluations, notify
from raypfl.runtime.parameter_server import ParameterServer
from raypfl.runtime.scheduling import assign_cohort, split_range
from raypfl.runtime.setup import FederationSetup
from raypfl.runtime.worker import ClientWorker

log = logging.getLogger(__name__)

#: Variables that MPI launchers set in every rank's environment (MPICH/Hydra, PMIx, Open MPI).
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")
MODES = ("server", "allgather")


def launched_by_mpiexec() -> bool:
    return any(v in os.environ for v in LAUNCHER_VARIABLES)


class ReplicaDivergence(RuntimeError):
    """In allgather mode, the ranks' global models differ after a round."""


class MPIRuntime:
    """Ranks of one MPI job; only rank 0 (`is_driver`) runs the experiment loop, the others `serve()`."""

    def __init__(self, spec: RuntimeSpec, comm=None):
        if comm is None and not launched_by_mpiexec():
            raise ConfigError(
                "runtime=mpi must be started under mpiexec: `mpiexec -n 2 python -m raypfl ... runtime=mpi`"
            )
        if spec.mpi_mode not in MODES:
            raise ConfigError(f"runtime.mpi_mode={spec.mpi_mode} must be one of {', '.join(MODES)}")
        from mpi4py import MPI

        self.comm = comm or MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.mode = spec.mpi_mode
        self.is_driver = self.rank == 0
        self.worker: ClientWorker | None = None
        self.server: ParameterServer | None = None
        self.broadcast: Arrays = {}

    parallelism = 1  # set to the number of ranks in start()

    def start(self, setup: FederationSetup, initial: ServerSnapshot) -> None:
        if self.size > setup.partition.num_clients:
            raise ConfigError(
                f"mpiexec -n {self.size} starts more ranks than clients.num={setup.partition.num_clients}: "
                "use at most one rank per client"
            )
        self.setup = setup
        self.worker = ClientWorker(setup)
        self.parallelism = self.size
        self.sticky = setup.stateful_clients
        self.test_ranges = split_range(len(setup.dataset.test_y), self.size)
        self.broadcast = _buffers(initial.broadcast)
        self.layout = _layout(self.broadcast)  # every rank's buffers: the same names, shapes and dtypes
        if self.is_driver or self.mode == "allgather":
            self.server = ParameterServer(
                self.broadcast,
                setup.algorithm.server_update,
                version=initial.version,
                state=initial.state,
                finalize=setup.finalize,
            )
        if self.is_driver:
            log.info("mpi runtime: %d ranks, mode %s", self.size, self.mode)

    # --- what the driver calls (rank 0) ---------------------------------------------------------------

    def run_round(self, plan: RoundPlan, on_submitted: Callable[[], None] | None = None) -> RoundResult:
        notify(on_submitted)
        need = len(plan.cohort) if plan.need is None else plan.need
        self.comm.bcast(("round", plan.round_idx, list(plan.cohort), dict(plan.work), need), root=0)
        return self._round(plan.round_idx, plan.cohort, plan.work, need)

    @property
    def version(self) -> int:
        """The latest global model's version number."""
        return self.server.latest

    def evaluate(self) -> Evaluation:
        self.comm.bcast(("evaluate",), root=0)
        return self._evaluate()

    def evaluate_clients(self, clients: list[int], states: dict[int, Any]) -> list[dict[str, Any]]:
        """Every rank tests its share of `clients` (their states live there: `states` is not used)."""
        self.comm.bcast(("evaluate_clients", list(clients)), root=0)
        return self._evaluate_clients(list(clients))

    def global_weights(self) -> np.ndarray:
        return self.broadcast[MODEL].copy()

    def server_snapshot(self) -> ServerSnapshot:
        return ServerSnapshot(self.server.latest, _buffers(self.broadcast), self.server.server_state())

    def close(self) -> None:
        if self.is_driver and self.worker is not None:
            self.comm.bcast(("stop",), root=0)
        self.worker = None

    # --- what every other rank does ---------------------------------------------------------------------

    def serve(self) -> None:
        """Follow rank 0's commands until it stops."""
        while True:
            command = self.comm.bcast(None, root=0)
            if command[0] == "round":
                self._round(*command[1:])
            elif command[0] == "evaluate":
                self._evaluate()
            elif command[0] == "evaluate_clients":
                self._evaluate_clients(command[1])
            else:
                return

    # --- collective steps, run by every rank --------------------------------------------------------------

    def _sync_weights(self) -> None:
        """Server mode: the other ranks receive rank 0's broadcast, one `Bcast` per named array in name
        order (allgather replicas already agree)."""
        if self.mode == "server":
            for name in sorted(self.broadcast):
                self.comm.Bcast(self.broadcast[name], root=0)

    def _round(
        self, round_idx: int, cohort: list[int], work: dict[int, dict], need: int
    ) -> RoundResult | None:
        self._sync_weights()
        mine = assign_cohort(cohort, [self.setup.partition.size(c) for c in cohort], self.size, self.sticky)[
            self.rank
        ]
        # the clients' states stay on this rank
        partial, metrics, _ = self.worker.train_cohort(self.broadcast, round_idx, mine, work)
        if isinstance(partial, Stacked):  # a robust aggregator: every client's update, pickled as it is
            gather = self.comm.gather if self.mode == "server" else self.comm.allgather
            pairs = (
                gather((partial, metrics), root=0) if self.mode == "server" else gather((partial, metrics))
            )
            if self.mode == "server" and not self.is_driver:
                return None
            partials, per_rank = [p for p, _ in pairs], [m for _, m in pairs]
        else:
            gathered = self._gather_sums(partial, metrics)
            if gathered is None:
                return None
            partials, per_rank = gathered
        version = self._aggregate(partials, need)
        if self.mode == "allgather":
            self._check_replicas()
        if not self.is_driver:
            return None
        return RoundResult.from_workers(version, per_rank, self.server.round_summary())

    def _gather_sums(self, partial: Aggregate, metrics: list[dict]) -> tuple[list[Aggregate], list] | None:
        """Every rank's partial sums on rank 0 (every rank, in allgather mode): one `Gather` of float64
        buffers per statistic; None on ranks that receive nothing."""
        shapes = {name: total.shape for name, total in partial.totals.items()}
        # the small part first, to every rank: then each knows every statistic's name and shape
        metas = self.comm.allgather(
            (dict(partial.weights), partial.clients, partial.rejected, metrics, shapes)
        )
        named = {name: shape for meta in metas for name, shape in meta[4].items()}
        received: dict[str, np.ndarray | None] = {}
        for name in sorted(named):  # one Gather (Allgather) of float64 partial sums per statistic
            total = partial.totals.get(name)
            send = np.ascontiguousarray(total if total is not None else np.zeros(named[name], np.float64))
            if self.mode == "server":
                received[name] = np.empty((self.size, *named[name]), np.float64) if self.is_driver else None
                self.comm.Gather(send, received[name], root=0)
            else:
                received[name] = np.empty((self.size, *named[name]), np.float64)
                self.comm.Allgather(send, received[name])
        if self.mode == "server" and not self.is_driver:
            return None
        partials = [
            Aggregate(
                {name: received[name][rank] for name in shapes}, dict(weights), list(clients), list(rejected)
            )
            for rank, (weights, clients, rejected, _, shapes) in enumerate(metas)
        ]
        return partials, [meta[3] for meta in metas]

    def _aggregate(self, partials: list[Aggregate], need: int) -> int:
        """Push every rank's partial (in rank order) to this rank's parameter server; adopt the result."""
        version = self.server.latest
        self.server.expect(version, self.size, need)
        for partial in partials:
            self.server.push(version, partial)
        broadcast = _buffers(self.server.pull_latest()[1])
        if _layout(broadcast) != self.layout:
            raise ValueError(
                f"algorithm {type(self.setup.algorithm).__name__}: its broadcast "
                f"changed names, shapes or dtypes ({self.layout} -> {_layout(broadcast)}); MPI ranks "
                "receive it into fixed buffers"
            )
        self.broadcast = broadcast
        return self.server.latest

    def _check_replicas(self) -> None:
        hasher = hashlib.sha256()
        for name in sorted(self.broadcast):
            hasher.update(self.broadcast[name].tobytes())
        digest = hasher.hexdigest()
        digests = self.comm.allgather(digest)
        if len(set(digests)) != 1:
            raise ReplicaDivergence(
                f"rank {self.rank}: global model replicas differ after the round: {digests}"
            )
        if self.is_driver:
            log.debug("allgather: %d replicas identical (%s)", self.size, digest[:12])

    def _evaluate_clients(self, clients: list[int]) -> list[dict[str, Any]] | None:
        """This rank's share of a per-client evaluation: the clients it trains (their state is here) when
        clients keep state, else an even slice; gathered on rank 0 in client order."""
        self._sync_weights()
        if self.sticky:  # where round after round it trains them
            mine = assign_cohort(clients, [0] * len(clients), self.size, sticky=True)[self.rank]
        else:
            ranges = split_range(len(clients), self.size)
            start, stop = ranges[self.rank] if self.rank < len(ranges) else (0, 0)
            mine = clients[start:stop]
        parts = self.comm.gather(self.worker.evaluate_clients(self.broadcast, mine), root=0)
        if not self.is_driver:
            return None
        return sorted((row for part in parts for row in part), key=lambda row: row["client"])

    def _evaluate(self) -> Evaluation | None:
        self._sync_weights()
        start, stop = self.test_ranges[self.rank] if self.rank < len(self.test_ranges) else (0, 0)
        part = self.worker.evaluate(self.broadcast, start, stop)
        parts = self.comm.gather(part, root=0)
        return combine_evaluations(parts) if self.is_driver else None


def _buffers(broadcast: Arrays) -> Arrays:
    """Writable, contiguous copies of a broadcast's arrays (what `Bcast` reads from and writes into)."""
    return {name: np.array(array, order="C") for name, array in broadcast.items()}


def _layout(broadcast: Arrays) -> dict[str, tuple]:
    return {name: (array.shape, array.dtype.str) for name, array in sorted(broadcast.items())}
