"""Small classifiers used in federated-learning experiments (images, and flat vectors), looked up by name.

Every model maps a float32 batch shaped (N, *in_shape) to logits shaped (N, num_classes);
none applies softmax, since the training loop uses cross-entropy on logits. Sizes of the
flattened features are computed from in_shape, so each model also builds for e.g. CIFAR-10.

Parameter counts for MNIST (in_shape=(1, 28, 28), num_classes=10):
    mlp 199,210 | cnn 1,663,370 | keras_cnn 600,810 | tiny_cnn 28,938
    torch_example_cnn 21,840 | narrow_cnn 34,318 | deep_mlp 366,730 | logreg 7,850
On dataset=synthetic (in_shape=(60,)): logreg 610, mlp 54,410 (the conv models need images).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from raypfl.errors import ConfigError

__all__ = [
    "LogReg",
    "MLP",
    "CNN",
    "KerasCNN",
    "TinyCNN",
    "TorchExampleCNN",
    "NarrowCNN",
    "DeepMLP",
    "MODELS",
    "build_model",
    "count_parameters",
]


def _flat_size(features: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Number of features per example after `features`, found by a dummy forward that uses no randomness."""
    was_training = features.training
    features.eval()  # dropout in train mode would draw from the global RNG and shift later initialisation
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, *in_shape))
    finally:
        features.train(was_training)
    return out.numel()


def _channels(in_shape: tuple[int, ...]) -> int:
    if len(in_shape) != 3:
        raise ConfigError(f"in_shape={tuple(in_shape)} must be (channels, height, width) for a conv model")
    return in_shape[0]


class LogReg(nn.Module):
    """Multinomial logistic regression: one linear layer on the flattened input (FedProx's Synthetic)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLP(nn.Module):
    """Fully connected ReLU network on flattened images (McMahan et al. 2NN: 784-200-200-10)."""

    def __init__(
        self, in_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (200, 200)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DeepMLP(MLP):
    """Deeper fully connected ReLU network: 784-256-256-256-128-10."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__(in_shape, num_classes, hidden=(256, 256, 256, 128))


class CNN(nn.Module):
    """McMahan et al. CNN: two 5x5 'same' convs (32, 64) with 2x2 max-pooling, fc 512, fc out."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(_channels(in_shape), 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_size(self.features, in_shape), 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class KerasCNN(nn.Module):
    """Keras mnist_cnn example: two 3x3 valid convs (32, 32), max-pool, dropout .25, fc 128, dropout .5."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(_channels(in_shape), 32, kernel_size=3),
            nn.ReLU(),
            nn.Conv2d(32, 32, kernel_size=3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_size(self.features, in_shape), 128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TinyCNN(nn.Module):
    """Tiny CNN: two 5x5 'same' convs (16, 32) with 2x2 max-pooling, then one linear layer."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(_channels(in_shape), 16, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(_flat_size(self.features, in_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TorchExampleCNN(nn.Module):
    """Classic (older) PyTorch MNIST example: conv 10, conv 20 + Dropout2d, fc 50 + dropout, fc out."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(_channels(in_shape), 10, kernel_size=5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(10, 20, kernel_size=5),
            nn.Dropout2d(),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_size(self.features, in_shape), 50),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(50, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class NarrowCNN(nn.Module):
    """Narrow CNN, no pooling: 3x3 'same' convs (64, then a 4-channel bottleneck), then one linear layer."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(_channels(in_shape), 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 4, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(_flat_size(self.features, in_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "keras_cnn": KerasCNN,
    "tiny_cnn": TinyCNN,
    "torch_example_cnn": TorchExampleCNN,
    "narrow_cnn": NarrowCNN,
    "deep_mlp": DeepMLP,
    "logreg": LogReg,
}


def build_model(name: str, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """A freshly initialised model `name` for inputs (N, *in_shape), giving logits (N, num_classes)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model={name} (choose from: {', '.join(MODELS)})")
    in_shape = tuple(int(d) for d in in_shape)
    if not in_shape or any(d < 1 for d in in_shape):
        raise ConfigError(f"in_shape={in_shape} must be non-empty with every dimension >= 1")
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes={num_classes} must be >= 1")
    try:
        return MODELS[name](in_shape, int(num_classes))
    except RuntimeError as e:  # e.g. an image too small for the model's convolutions and pooling
        raise ConfigError(f"model={name} cannot take in_shape={in_shape}: {e}") from e


def count_parameters(model: nn.Module) -> int:
    """Total number of scalar parameters in `model` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
