"""Local training and evaluation loops shared by every algorithm's client half and by the evaluator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raypfl.config import OptimSpec, TrainSpec


@dataclass
class TrainResult:
    """Mean loss and accuracy over the local training batches, and how many steps ran."""

    loss: float
    accuracy: float
    steps: int
    samples_seen: int


def make_optimizer(params, spec: OptimSpec) -> torch.optim.Optimizer:
    """The client optimizer named by `optim.name`."""
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"optim.name={spec.name} is not supported")


def batches(indices: np.ndarray, spec: TrainSpec, generator: torch.Generator):
    """Yield index batches: `local_epochs` shuffled passes, or exactly `local_steps` batches."""
    idx = torch.tensor(np.asarray(indices), dtype=torch.int64)  # a copy: partitions are read-only
    n = idx.numel()
    steps_left = spec.local_steps
    epochs = spec.local_epochs if steps_left is None else None
    epoch = 0
    while (epochs is None and steps_left > 0) or (epochs is not None and epoch < epochs):
        order = idx[torch.randperm(n, generator=generator)]
        for start in range(0, n, spec.batch_size):
            yield order[start : start + spec.batch_size]
            if steps_left is not None:
                steps_left -= 1
                if steps_left == 0:
                    return
        epoch += 1


def train_local(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: np.ndarray,
    spec: TrainSpec,
    generator: torch.Generator,
    adjust: Callable[[], None] | None = None,
) -> TrainResult:
    """Minimise cross-entropy on `x[indices]` in place; dropout is on (train mode).

    `adjust` (if given) runs after each backward pass, before the optimizer step: an algorithm's change
    to the gradients (FedProx's proximal term, SCAFFOLD's control-variate correction).
    """
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = 0
    seen = 0
    steps = 0
    for batch in batches(indices, spec, generator):
        xb, yb = x[batch].to(device), y[batch].to(device)  # no-ops on the CPU
        optimizer.zero_grad(set_to_none=True)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        if adjust is not None:
            adjust()
        optimizer.step()
        loss_sum += loss.detach() * len(batch)
        correct += int((logits.detach().argmax(1) == yb).sum())
        seen += len(batch)
        steps += 1
    seen_ = max(seen, 1)
    return TrainResult(float(loss_sum) / seen_, correct / seen_, steps, seen)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> tuple[float, int, int]:
    """(summed cross-entropy, number correct, number of samples) in eval mode (dropout off)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size].to(device))
        yb = y[start : start + batch_size].to(device)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum, correct, len(y)
