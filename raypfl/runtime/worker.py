"""A client worker: trains cohorts of clients on one model in place and returns ONE partial sum per round.

It is the body of a Ray client actor and of the sequential runtime alike; it never knows which
algorithm it runs, only that the algorithm has a client half.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raypfl import seeding
from raypfl.algorithms.aggregate import MODEL, Aggregate, Arrays, ClientUpdate, Stacked
from raypfl.algorithms.base import ClientContext
from raypfl.models.weights import set_flat, shared_tensor
from raypfl.models.zoo import build_model
from raypfl.postprocess.state import join_state, split_state
from raypfl.runtime.base import work_amount
from raypfl.runtime.setup import FederationSetup
from raypfl.training.local import evaluate

log = logging.getLogger(__name__)


def client_seed(root: int, round_idx: int, client: int) -> int:
    """The seed of one client's training in one round, whoever trains it."""
    return seeding.derive_seed(root, seeding.CLIENT, round_idx, client)


class TransientClientError(RuntimeError):
    """An injected, transient failure of a client's training (`faults.error_prob`); retried."""


@dataclass
class _Fate:
    """What fault injection has in store for one client in one round (seeded, whoever trains it)."""

    dropped: bool
    corrupt: bool
    failing_attempts: int  # the first this-many attempts raise


def client_fate(setup: FederationSetup, round_idx: int, client: int) -> _Fate:
    faults = setup.faults
    if faults is None:
        return _Fate(False, False, 0)
    rng = seeding.rng(setup.seed, seeding.FAULT, round_idx, client)
    dropped, corrupt, *errors = rng.random(3 + faults.max_retries)
    failing = 0
    while failing < len(errors) and errors[failing] < faults.error_prob:
        failing += 1
    return _Fate(bool(dropped < faults.drop_prob), bool(corrupt < faults.corrupt_prob), failing)


class ClientWorker:
    """Holds one model, a view of the training data and (on MPI) the state of the clients it trains.

    Fault injection happens here, seeded per (round, client), so every runtime sees the same faults:
    dropped clients never answer, corrupt ones send NaN, failing ones raise and are retried here with
    backoff, and slow ones (`clients.speed`) sleep in proportion to their compute. A driver may cancel
    a round (`cancel_round`) that closed without them: remaining clients and sleeps stop at once.
    """

    def __init__(self, setup: FederationSetup, rebuild_model: bool = False, device: str = "cpu"):
        torch.set_num_threads(setup.torch_threads)
        self.rebuild_model = rebuild_model  # build a fresh model per client (the "faithful" seed-system mode)
        self.setup = setup
        self.device = torch.device(device)  # the model lives here; data stays in (shared) CPU memory
        self.algorithm = setup.algorithm
        data = setup.dataset
        self.x, self.y = shared_tensor(data.train_x), shared_tensor(data.train_y)
        self.test_x, self.test_y = shared_tensor(data.test_x), shared_tensor(data.test_y)
        torch.manual_seed(setup.seed)  # weights are overwritten before use; this keeps init cheap and quiet
        self.model = self._new_model()
        self.client_states: dict[int, Any] = {}  # used when the driver does not pass states (MPI ranks)
        self.cancelled_round = 0
        self.incarnation = os.getpid()
        self._flipped_y: torch.Tensor | None = None  # attack.kind=label_flip: the poisoned labels, made once

    def _new_model(self) -> torch.nn.Module:
        data = self.setup.dataset
        return build_model(self.setup.model, data.in_shape, data.num_classes).to(self.device)

    def cancel_round(self, round_idx: int) -> None:
        """Stop working on `round_idx` (it closed): queued clients are skipped, sleeping ones wake up."""
        self.cancelled_round = max(self.cancelled_round, round_idx)

    def _cancelled(self, round_idx: int) -> bool:
        return self.cancelled_round >= round_idx

    def train_cohort(
        self,
        broadcast: Arrays,
        round_idx: int,
        clients: list[int],
        work: dict[int, dict[str, Any]] | None = None,
        states: dict[int, Any] | None = None,
    ) -> tuple[Aggregate, list[dict[str, Any]], dict[int, Any]]:
        """Train `clients` from the server's `broadcast` (named arrays; `model` is the global model).

        Returns their weighted partial sum, per-client metrics (with a `status`: ok, rejected, dropped,
        failed or cancelled) and, for stateful algorithms, the clients' new states. `work` overrides
        `train.*` per client (load balancing); `states` are the clients' states kept by the driver
        (None: this worker's own copies).
        """
        partial = Stacked() if self.setup.stacks else Aggregate()
        metrics: list[dict[str, Any]] = []
        new_states: dict[int, Any] = {}
        own_states = states is None
        states = self.client_states if own_states else states
        if self.setup.vectorize and clients:
            answers = self._train_lockstep(broadcast, round_idx, clients, work or {}, states)
        else:
            answers = (
                self._train_client(broadcast, round_idx, client, (work or {}).get(client), states)
                for client in clients
            )
        for client, (update, state, row) in zip(clients, answers):
            if update is not None:
                row["accepted"] = partial.add(update)
                row["status"] = "ok" if row["accepted"] else "rejected"
                if self.setup.stateful_clients and row["accepted"]:  # a rejected update's state is not kept
                    new_states[client] = state
                    if own_states:
                        self.client_states[client] = state
            metrics.append(row)
        return partial, metrics, ({} if own_states else new_states)

    def _train_client(
        self,
        broadcast: Arrays,
        round_idx: int,
        client: int,
        work: dict[str, Any] | None,
        states: dict[int, Any],
    ) -> tuple[ClientUpdate | None, Any, dict[str, Any]]:
        start = time.perf_counter()
        row: dict[str, Any] = {"round": round_idx, "client": client, "accepted": False, "attempts": 0}
        row["work"] = work_amount(work)
        fate = client_fate(self.setup, round_idx, client)
        if self._cancelled(round_idx):
            return None, None, {**row, "status": "cancelled", "seconds": 0.0}
        if fate.dropped:
            return None, None, {**row, "status": "dropped", "seconds": 0.0}
        faults = self.setup.faults
        retries = faults.max_retries if faults is not None else 0
        update = state = None
        for attempt in range(retries + 1):
            row["attempts"] = attempt + 1
            attempt_start = time.perf_counter()
            try:
                if attempt < fate.failing_attempts:
                    raise TransientClientError(f"injected error (round {round_idx}, attempt {attempt + 1})")
                update, state = self._client_update(broadcast, round_idx, client, work, states)
                break
            except Exception as exc:  # a client's failure must not take the worker (or the round) down
                injected = isinstance(exc, TransientClientError)
                log.log(
                    logging.INFO if injected else logging.WARNING,  # injected ones are counted, not shouted
                    "client %d, round %d, attempt %d failed: %s",
                    client,
                    round_idx,
                    attempt + 1,
                    exc,
                    exc_info=not injected,  # a real bug shows its traceback
                )
                if attempt == retries:
                    return None, None, {**row, "status": "failed", "seconds": time.perf_counter() - start}
                time.sleep(faults.retry_backoff_s * 2**attempt if faults is not None else 0.0)
        compute = time.perf_counter() - attempt_start  # the successful attempt's training time
        update, state, nbytes = self._postprocess(update, state, states.get(client), round_idx)
        if fate.corrupt:  # every statistic of the update is corrupted
            for name, vector in update.statistics.items():
                vector = update.statistics[name] = vector.copy()
                vector.reshape(-1)[:: max(1, vector.size // 7)] = np.nan
        if self.setup.eval_local:
            n = self.setup.eval_local
            _, correct, count = evaluate(self.model, self.test_x[:n], self.test_y[:n])
            update.metrics["local_acc"] = correct / max(count, 1)
        if not self._slow_down(client, round_idx, compute):
            return None, None, {**row, **update.metrics, "status": "cancelled", "seconds": compute}
        row["bytes_up"] = nbytes
        return update, state, {**row, **update.metrics, "seconds": time.perf_counter() - start}

    def _postprocess(
        self, update: ClientUpdate, state: Any, stored: Any, round_idx: int
    ) -> tuple[ClientUpdate, Any, int]:
        """A malicious client's attack on its update, then the client steps (`postprocess`): the update
        the server gets, the client's state to keep (the algorithm's, with the steps' own, e.g. an error
        feedback residual) and the bytes it would cost on the wire."""
        if self.setup.attack is not None:
            update = self.setup.attack.poison_update(update, round_idx)
        pipeline = self.setup.postprocess
        if pipeline is None:
            return update, state, update.nbytes
        _, steps_state = split_state(stored)
        update, steps_state, nbytes, metrics = pipeline.apply(
            update, steps_state, self.setup.seed, round_idx, update.client
        )
        update.metrics.update(metrics)
        return update, join_state(state, steps_state), nbytes

    def _client_update(
        self,
        broadcast: Arrays,
        round_idx: int,
        client: int,
        work: dict[str, Any] | None,
        states: dict[int, Any],
    ) -> tuple[ClientUpdate, Any]:
        if self.rebuild_model:
            self.model = self._new_model()
        set_flat(self.model, broadcast[MODEL])
        state, _ = split_state(states.get(client))  # the algorithm's part (a postprocessor may keep its own)
        ctx = self._context(client, round_idx, work, copy.deepcopy(state) if state is not None else None)
        torch.manual_seed(
            ctx.generator.initial_seed()
        )  # dropout and any other torch randomness of this client
        return self.algorithm.client_update(ctx, broadcast)

    def _context(self, client: int, round_idx: int, work: dict[str, Any] | None, state: Any) -> ClientContext:
        """One client's round on this worker's model (global weights already loaded), seeded per client."""
        x, y, indices = self.client_data(client, round_idx)
        return ClientContext(
            client=client,
            round_idx=round_idx,
            model=self.model,
            x=x,
            y=y,
            indices=indices,
            generator=torch.Generator().manual_seed(client_seed(self.setup.seed, round_idx, client)),
            state=state,  # a copy: a failed attempt must not touch the driver's
            work=work or {},
        )

    def _train_lockstep(
        self,
        broadcast: Arrays,
        round_idx: int,
        clients: list[int],
        work: dict[int, dict[str, Any]],
        states: dict[int, Any],
    ) -> list[tuple[ClientUpdate, Any, dict[str, Any]]]:
        """All `clients` together in lock-step (`runtime.vectorize=true`; validated free of faults): each
        one's (update, state to keep, row), as `_train_client` gives them."""
        start = time.perf_counter()
        set_flat(self.model, broadcast[MODEL])
        contexts = []
        for client in clients:
            state, _ = split_state(states.get(client))  # the algorithm's part, as on the plain path
            own = copy.deepcopy(state) if state is not None else None
            contexts.append(self._context(client, round_idx, work.get(client), own))
        updates = self.algorithm.client_updates(contexts, broadcast)
        share = (time.perf_counter() - start) / max(len(clients), 1)  # lock-step: each client's share
        answers = []
        for client, (update, state) in zip(clients, updates):
            row = {"round": round_idx, "client": client, "attempts": 1, "work": work_amount(work.get(client))}
            update, state, row["bytes_up"] = self._postprocess(update, state, states.get(client), round_idx)
            answers.append((update, state, {**row, **update.metrics, "seconds": share}))
        return answers

    def client_data(self, client: int, round_idx: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(x, y, indices) of one client's round: a view of the shared arrays, or the client's own data
        when the partition generates it (`client_data(client, round)` on the partition, e.g. synthetic)."""
        partition = self.setup.partition
        generate = getattr(partition, "client_data", None)
        poisoned = self.setup.attack is not None and self.setup.attack.poisons_data
        poisoned = poisoned and self.setup.attack.attacks(client)
        if generate is None:
            return self.x, self._poisoned_y() if poisoned else self.y, partition.indices(client, round_idx)
        x, y = generate(client, round_idx)
        if poisoned:
            y = self.setup.attack.flip_labels(np.asarray(y), self.setup.dataset.num_classes)
        return shared_tensor(x), shared_tensor(y), np.arange(len(y), dtype=np.int64)

    def _poisoned_y(self) -> torch.Tensor:
        """Every training label flipped (attack.kind=label_flip); malicious clients index into it."""
        if self._flipped_y is None:
            flipped = self.setup.attack.flip_labels(self.y.numpy(), self.setup.dataset.num_classes)
            self._flipped_y = torch.from_numpy(np.ascontiguousarray(flipped))
        return self._flipped_y

    def client_test_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of one client's held-out samples (`partition.client_test_fraction`)."""
        partition = self.setup.partition
        generate = getattr(partition, "client_test_data", None)
        if generate is not None:
            x, y = generate(client)
            return shared_tensor(x), shared_tensor(y)
        held = torch.from_numpy(np.asarray(partition.test_indices(client), dtype=np.int64))
        return self.x[held], self.y[held]

    def evaluate_clients(
        self, broadcast: Arrays, clients: list[int], states: dict[int, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Test each client on its held-out data: the global model and, if the algorithm has them, the
        client's personal model (from its state: `states`, else this worker's own copies)."""
        states = self.client_states if states is None else states
        rows = []
        for client in clients:
            x, y = self.client_test_data(client)
            set_flat(self.model, broadcast[MODEL])
            loss, correct, count = evaluate(self.model, x, y)
            row = {"client": client, "eval_samples": count, "eval_acc": correct / max(count, 1)}
            row["eval_loss"] = loss / max(count, 1)
            personal = self.algorithm.personal_model(split_state(states.get(client))[0], broadcast)
            if personal is not None:
                set_flat(self.model, personal)
                loss, correct, count = evaluate(self.model, x, y)
                row.update(personal_acc=correct / max(count, 1), personal_loss=loss / max(count, 1))
            rows.append(row)
        return rows

    def _slow_down(self, client: int, round_idx: int, compute_s: float) -> bool:
        """Sleep `(speed factor - 1) * compute` for a slow client; False if the round was cancelled."""
        if self.setup.speed is None:
            return True
        wake = time.perf_counter() + max(0.0, float(self.setup.speed[client]) - 1.0) * compute_s
        while (left := wake - time.perf_counter()) > 0:
            if self._cancelled(round_idx):
                return False
            time.sleep(min(left, 0.05))
        return not self._cancelled(round_idx)

    def evaluate(self, broadcast: Arrays, start: int, stop: int) -> tuple[float, int, int]:
        """(summed loss, correct, count) of the broadcast's global model on test samples [start, stop)."""
        set_flat(self.model, broadcast[MODEL])
        return evaluate(self.model, self.test_x[start:stop], self.test_y[start:stop])

    def ready(self) -> int:
        """Answers once the worker is built (data mapped, model made): its incarnation (process id)."""
        return self.incarnation
