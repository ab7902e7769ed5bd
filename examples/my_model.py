"""A model of your own: any function or class that returns a `torch.nn.Module` mapping a float32 batch
(N, *in_shape) to logits (N, num_classes).

    python -m raypfl model._target_=examples.my_model.make_net +model.width=16 +model.hidden=64

raypfl passes the dataset's `in_shape` and `num_classes` because the signature names them; every other
argument comes from `model.*` (`+model.KEY=VALUE` on the command line). It is built under the run's seed
(the same initial model on every runtime and every rerun) and checked on two test samples before the run
starts.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """One 3x3 conv (`width` channels) with 2x2 max-pooling, a hidden layer of `hidden` units, the logits."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int = 8, hidden: int = 32) -> None:
        super().__init__()
        channels, height, breadth = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(width * (height // 2) * (breadth // 2), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def make_net(
    in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, width: int = 8, hidden: int = 32
) -> nn.Module:
    """The factory `model._target_` names; MNIST-shaped input by default (1, 28, 28), 10 classes."""
    if len(in_shape) != 3:
        raise ValueError(f"make_net needs images (channels, height, width), got in_shape={tuple(in_shape)}")
    return SmallNet(tuple(in_shape), num_classes, width, hidden)
