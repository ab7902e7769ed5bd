"""W on Apple's pfl-research (pfl): FederatedAveraging with the PyTorch backend and pfl's SimulatedBackend.

    python benchmarks/impl_pfl.py --model mlp --rounds 12 --out /tmp/pfl.json

How W maps onto pfl (everything runs in this one process, 1 torch thread, as pfl's simulator does
without its multi-worker launcher):

- model: `raypfl.models.zoo.build_model` wrapped in a module with the `loss`/`metrics` methods that
  `pfl.model.pytorch.PyTorchModel` needs; local optimizer `torch.optim.SGD(lr=0.05)` (no momentum), central
  optimizer `SGD(lr=1.0)`, so applying the averaged model difference is exactly `w += mean(delta)`.
- data: a `pfl.data.FederatedDataset` over the shared IID partition. Its user sampler is pfl's
  `MinimizeReuseUserSampler` fed with the exact sequence of W's cohorts (`workload.cohort(w, round)`, round
  after round), so pfl trains the same 10 clients per round as the floor. A user id is (round, client), so
  the dataset made for it holds the client's 600 images in the order of that round's shuffle
  (`torch.randperm` with `workload.shuffle_seed(w, round, client)`), and pfl's batching (no shuffle of its
  own) yields the floor's batches.
- training: `FederatedAveraging` with `NNAlgorithmParams(train_cohort_size=10, val_cohort_size=None)` and
  `NNTrainHyperParams(local_num_epochs=1, local_batch_size=10, local_learning_rate=0.05)`; weighting by
  samples with `pfl.aggregate.weighting.WeightByDatapoints`. pfl's local before/after-training evaluation of
  every user (which it does in round 1 even with a large evaluation_frequency) is switched off: W has none.
- evaluation: a callback evaluates the global model on the 10,000 test images (pfl's `model.evaluate`, batch
  256) after every central iteration and reports to `RoundClock`. (pfl's own `CentralEvaluationCallback`
  evaluates before training and skips the end of the first iteration, so it does not fit W.)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import numpy as np
import torch
import torch.nn.functional as F
import workload
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import MinimizeReuseUserSampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from torch import nn

from raypfl.models.weights import set_flat
from raypfl.models.zoo import build_model

EVAL_BATCH = 256


class PflModule(nn.Module):
    """A raypfl model plus the `loss` and `metrics` methods pfl's PyTorchModel calls."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.train()
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        self.eval()
        logits = self(x)
        n = len(y)
        return {
            "loss": Weighted(float(F.cross_entropy(logits, y, reduction="sum")), n),
            "accuracy": Weighted(float((logits.argmax(1) == y).sum()), n),
        }


class FedAvgNoLocalEval(FederatedAveraging):
    """FedAvg without pfl's per-user evaluation before and after local training (not part of W)."""

    def get_next_central_contexts(self, *args, **kwargs):
        contexts, model, metrics = super().get_next_central_contexts(*args, **kwargs)
        if contexts is not None:
            contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
        return contexts, model, metrics


class CentralTestEval(TrainingProcessCallback):
    """Evaluates the global model on the test set at the end of every central iteration (= round)."""

    def __init__(self, test: Dataset, clock: workload.RoundClock):
        self.test, self.clock = test, clock
        self.params = NNEvalHyperParams(local_batch_size=EVAL_BATCH)

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        metrics = model.evaluate(self.test, eval_params=self.params)
        accuracy = metrics["accuracy"].overall_value
        self.clock.round_done(central_iteration + 1, accuracy)
        return False, Metrics()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload.add_arguments(parser)
    args = parser.parse_args()
    w = workload.from_args(args)
    torch.set_num_threads(1)
    logging.getLogger("pfl").setLevel(logging.WARNING)
    clock = workload.RoundClock("pfl", w, args.out)
    data, partition, weights = workload.load(w)
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    test = Dataset((torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)))
    client_idx = {c: torch.from_numpy(np.array(partition.indices(c))) for c in range(w.num_clients)}

    def make_user_dataset(user: tuple[int, int]) -> Dataset:
        round_idx, client = user
        idx = client_idx[client]
        generator = torch.Generator().manual_seed(workload.shuffle_seed(w, round_idx, client))
        order = idx[torch.randperm(len(idx), generator=generator)]
        return Dataset((x[order], y[order]), user_id=f"{client}")

    schedule = [(r, c) for r in range(1, w.rounds + 1) for c in workload.cohort(w, r)]
    train_data = FederatedDataset(make_user_dataset, MinimizeReuseUserSampler(schedule))
    val_data = FederatedDataset(make_user_dataset, MinimizeReuseUserSampler([]))  # never sampled

    net = build_model(w.model, data.in_shape, data.num_classes)
    set_flat(net, weights)
    module = PflModule(net)
    model = PyTorchModel(
        model=module,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
    )
    backend = SimulatedBackend(
        training_data=train_data, val_data=val_data, postprocessors=[WeightByDatapoints()]
    )
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=w.rounds,
        evaluation_frequency=1,
        train_cohort_size=w.per_round,
        val_cohort_size=None,
    )
    train_params = NNTrainHyperParams(
        local_num_epochs=w.local_epochs, local_learning_rate=w.lr, local_batch_size=w.batch_size
    )
    FedAvgNoLocalEval().run(
        algorithm_params=algorithm_params,
        backend=backend,
        model=model,
        model_train_params=train_params,
        model_eval_params=NNEvalHyperParams(local_batch_size=EVAL_BATCH),
        callbacks=[CentralTestEval(test, clock)],
    )
    clock.write()


if __name__ == "__main__":
    main()
