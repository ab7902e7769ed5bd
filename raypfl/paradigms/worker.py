"""What every worker (or gossip node) of the non-federated paradigms is made of, and the driver's evaluator.

A `ShardTrainer` owns a model, its data shard (an index array into the shared dataset) and a seeded batch
stream; it computes gradients of the flat weight vector or takes local optimizer steps. A `FlatOptimizer`
is a torch optimizer over one flat vector (the parameter server's, and each all-reduce replica's).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from raypfl import seeding
from raypfl.config import OptimSpec
from raypfl.data.datasets import Dataset
from raypfl.errors import ConfigError
from raypfl.models.weights import flat_names, get_flat, set_flat, shared_tensor
from raypfl.models.zoo import build_model
from raypfl.training.local import evaluate, make_optimizer

if TYPE_CHECKING:
    from raypfl.paradigms.base import ParadigmContext


def check_gradient_model(model: torch.nn.Module, model_name: str) -> None:
    """Gradient exchange needs the flat weight vector to be exactly the parameters (no float buffers)."""
    if [name for name, _ in model.named_parameters()] != flat_names(model):
        raise ConfigError(
            f"model={model_name} has floating-point buffers (e.g. batch norm statistics): "
            "the parameter-server, all-reduce and gossip paradigms exchange parameters only"
        )


class FlatOptimizer:
    """A torch optimizer (`optim.*`) over one flat float32 vector: step(gradient) -> new weights."""

    def __init__(self, weights: np.ndarray, spec: OptimSpec):
        self.param = torch.nn.Parameter(torch.tensor(np.asarray(weights, np.float32)))
        self.optimizer = make_optimizer([self.param], spec)

    def step(self, gradient: np.ndarray, scale: float = 1.0) -> np.ndarray:
        grad = torch.tensor(np.asarray(gradient), dtype=torch.float32)  # a copy: Ray's arrays are read-only
        self.param.grad = grad * scale if scale != 1.0 else grad
        self.optimizer.step()
        return self.param.detach().numpy().copy()


class ShardTrainer:
    """A model, a data shard and a seeded, endless stream of shuffled batches from it."""

    def __init__(
        self,
        dataset: Dataset,
        indices: np.ndarray,
        model_name: str,
        weights: np.ndarray,
        optim: OptimSpec,
        batch_size: int,
        seed: int,
        key: int,
        delay_s: float = 0.0,
    ):
        self.model = build_model(model_name, dataset.in_shape, dataset.num_classes)
        check_gradient_model(self.model, model_name)
        set_flat(self.model, weights)
        self.optimizer = make_optimizer(self.model.parameters(), optim)
        self.x = shared_tensor(dataset.train_x)
        self.y = shared_tensor(dataset.train_y)
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        if len(self.indices) == 0:
            raise ConfigError(f"worker/node {key} got no training samples: fewer samples than workers")
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seeding.derive_seed(seed, seeding.SHARD, key))
        self.delay_s = delay_s  # a straggler sleeps this long before each step
        self._order = self.indices[:0]
        self._pos = 0

    @classmethod
    def for_shard(cls, ctx: ParadigmContext, dataset: Dataset, shard: int, delay_s: float) -> ShardTrainer:
        """The trainer of shard `shard` of the paradigm's partition (its batch stream keyed by the shard)."""
        return cls(
            dataset,
            ctx.partition.indices(shard, 1),
            ctx.model_name,
            ctx.weights,
            ctx.optim,
            ctx.dist.batch_size,
            ctx.seed,
            shard,
            delay_s,
        )

    def next_batch(self) -> torch.Tensor:
        """The next `batch_size` indices of an endless stream of shuffled passes over the shard.

        Every batch is full: one that crosses the end of a pass takes the rest from the next pass, so
        every step processes exactly `batch_size` samples (and budgets in samples are exact).
        """
        parts, need = [], self.batch_size
        while need > 0:
            if self._pos >= len(self._order):
                self._order = self.indices[torch.randperm(len(self.indices), generator=self.generator)]
                self._pos = 0
            part = self._order[self._pos : self._pos + need]
            self._pos += len(part)
            need -= len(part)
            parts.append(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _backward(self) -> tuple[float, int]:
        if self.delay_s:
            time.sleep(self.delay_s)
        batch = self.next_batch()
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x[batch]), self.y[batch])
        loss.backward()
        return float(loss.detach()), len(batch)

    def gradient(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, float, int]:
        """(flat gradient of the mean batch loss at `weights` (default: the model's own), loss, samples)."""
        if weights is not None:
            set_flat(self.model, weights)
        grad, loss, n = self.gradient_tensor()
        return grad.numpy(), loss, n

    def gradient_tensor(self) -> tuple[torch.Tensor, float, int]:
        """The flat gradient at the model's own weights, as a fresh tensor (for collectives)."""
        loss, n = self._backward()
        return torch.cat([p.grad.reshape(-1) for p in self.model.parameters()]), loss, n

    def set_gradient(self, flat: torch.Tensor) -> None:
        """Write a flat gradient back into the parameters' .grad (after an all-reduce)."""
        offset = 0
        for p in self.model.parameters():
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def local_steps(self, steps: int) -> tuple[float, int]:
        """`steps` optimizer steps on the model's own weights; (mean loss, samples)."""
        loss_sum, seen = 0.0, 0
        for _ in range(steps):
            loss, n = self._backward()
            self.optimizer.step()
            loss_sum += loss * n
            seen += n
        return loss_sum / max(seen, 1), seen

    def weights(self) -> np.ndarray:
        return get_flat(self.model)

    def load(self, weights: np.ndarray) -> None:
        set_flat(self.model, weights)


class Evaluator:
    """Test accuracy and loss of flat weight vectors (on the first `limit` test images, if given)."""

    def __init__(self, dataset: Dataset, model_name: str, limit: int | None = None):
        self.model = build_model(model_name, dataset.in_shape, dataset.num_classes)
        n = len(dataset.test_y) if limit is None else min(limit, len(dataset.test_y))
        self.x = shared_tensor(dataset.test_x[:n])
        self.y = shared_tensor(dataset.test_y[:n])

    def __call__(self, weights: np.ndarray) -> tuple[float, float]:
        """(accuracy, mean cross-entropy)."""
        set_flat(self.model, weights)
        loss_sum, correct, n = evaluate(self.model, self.x, self.y, batch_size=1000)
        return correct / n, loss_sum / n
