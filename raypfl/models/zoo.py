"""Small classifiers used in federated-learning experiments (images, and flat vectors), looked up by name,
and models of the user's own (`model._target_: package.factory`).

Every model maps a float32 batch shaped (N, *in_shape) to logits shaped (N, num_classes);
none applies softmax, since the training loop uses cross-entropy on logits. Sizes of the
flattened features are computed from in_shape, so each model also builds for e.g. CIFAR-10.

Parameter counts for MNIST (in_shape=(1, 28, 28), num_classes=10):
    mlp 199,210 | cnn 1,663,370 | keras_cnn 600,810 | tiny_cnn 28,938
    torch_example_cnn 21,840 | narrow_cnn 34,318 | deep_mlp 366,730 | logreg 7,850
On dataset=synthetic (in_shape=(60,)): logreg 610, mlp 54,410 (the conv models need images).

A model is described by a `ModelSpec` (a shipped name, or a factory's dotted path, plus keyword arguments):
small and picklable, so the driver, every Ray actor and every MPI rank build the same model from it with
`build_model`. A factory gets the dataset's `in_shape` and `num_classes` if its signature names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from raypfl.data.registry import accepts, check_arguments, locate, node_dict, reason
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
    "ModelSpec",
    "build_model",
    "check_model",
    "count_parameters",
    "model_factory",
    "model_spec",
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


class LeNet(nn.Module):
    """The small CNN of NIID-Bench (Li et al. 2022, "Federated Learning on Non-IID Data Silos"), LeNet-5
    style: conv 6 and conv 16 (5x5, each followed by ReLU and 2x2 max-pooling), then FC 120, 84, out."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(_channels(in_shape), 6, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_size(self.features, in_shape), 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

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
    "lenet": LeNet,
}


#: What raypfl passes to a model factory that names them in its signature (from the dataset).
SUPPLIED = ("in_shape", "num_classes")


@dataclass(frozen=True)
class ModelSpec:
    """What every process builds the model from (`model.*`): a shipped `name`, or a `target` factory (then
    `name` is only a label), and the keyword arguments of `model.*` (e.g. `+model.hidden=64`)."""

    name: str
    target: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """How error messages name it: `model=mlp` or `model._target_=pkg.make_net`."""
        return f"model._target_={self.target}" if self.target else f"model={self.name}"

    @property
    def label(self) -> str:
        """How logs name it: the short name, or the factory's path."""
        return self.target or self.name


def model_spec(model: ModelSpec | str | Mapping[str, Any] | Any) -> ModelSpec:
    """The spec of a shipped name, a `model` config node (`_target_` wins over `name`), or a spec."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        return ModelSpec(model)
    data = node_dict(model)
    name, target = data.pop("name", None), data.pop("_target_", None)
    if target is not None and (not isinstance(target, str) or not target.strip()):
        raise ConfigError(f"model._target_={target} must be a dotted path package.module.factory")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"model.name={name} must be a string")
    if not name and not target:
        raise ConfigError("model.name (a shipped model) or model._target_ (a factory of yours) must be set")
    kwargs = {str(k): v for k, v in data.items()}
    return ModelSpec(name or str(target).rsplit(".", 1)[-1], target or None, kwargs)


def model_factory(model: ModelSpec | str | Mapping[str, Any]) -> Callable[..., nn.Module]:
    """The class or function that builds the model, with `model.*` checked against its signature."""
    spec = model_spec(model)
    if spec.target:
        factory = locate("model._target_", spec.target)
    elif spec.name in MODELS:
        factory = MODELS[spec.name]
    else:
        raise ConfigError(f"unknown model={spec.name} (choose from: {', '.join(MODELS)})")
    supplied = [s for s in SUPPLIED if accepts(factory, s)]
    check_arguments(factory, spec.kwargs, "model", spec.key, supplied=supplied)
    return factory


def build_model(
    model: ModelSpec | str | Mapping[str, Any], in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10
) -> nn.Module:
    """A freshly initialised model for inputs (N, *in_shape), giving logits (N, num_classes).

    `model` is a shipped name (`"mlp"`), a `ModelSpec`, or the `model` config node. Initialisation draws from
    torch's global generator: seed it first (`torch.manual_seed`) for the same model every time.
    """
    spec = model_spec(model)
    factory = model_factory(spec)
    in_shape = tuple(int(d) for d in in_shape)
    if not in_shape or any(d < 1 for d in in_shape):
        raise ConfigError(f"in_shape={in_shape} must be non-empty with every dimension >= 1")
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes={num_classes} must be >= 1")
    given = {"in_shape": in_shape, "num_classes": int(num_classes)}
    kwargs = {**{k: v for k, v in given.items() if accepts(factory, k)}, **spec.kwargs}
    try:
        built = factory(**kwargs)
    except ConfigError:
        raise
    except RuntimeError as e:  # e.g. an image too small for the model's convolutions and pooling
        if spec.target:
            raise ConfigError(f"{spec.key}: building it failed for in_shape={in_shape} ({reason(e)})") from e
        raise ConfigError(f"model={spec.name} cannot take in_shape={in_shape}: {e}") from e
    except Exception as e:
        raise ConfigError(f"{spec.key}: building it failed ({reason(e)})") from e
    if not isinstance(built, nn.Module):
        raise ConfigError(f"{spec.key} returned a {type(built).__name__}, not a torch.nn.Module")
    return built


def check_model(
    model: ModelSpec | str | Mapping[str, Any],
    in_shape: tuple[int, ...],
    num_classes: int,
    sample: np.ndarray | None = None,
) -> nn.Module:
    """Build the model once and check it before any worker does: it has parameters and, on `sample` (a
    small batch of inputs), returns logits shaped (batch, num_classes). torch's global generator is left as
    it was. Returns the model; every problem is a ConfigError naming `model.*`."""
    spec = model_spec(model)
    with torch.random.fork_rng(devices=[]):
        built = build_model(spec, in_shape, num_classes)
        if count_parameters(built) == 0:
            raise ConfigError(f"{spec.key} has no parameters to train")
        if sample is None or not len(sample):
            return built
        batch = torch.as_tensor(np.ascontiguousarray(sample[:2]), dtype=torch.float32)
        was_training = built.training
        built.eval()
        try:
            with torch.no_grad():
                out = built(batch)
        except Exception as e:
            shape, why = tuple(batch.shape), reason(e)
            raise ConfigError(f"{spec.key}: its forward pass on a batch shaped {shape} failed ({why})") from e
        finally:
            built.train(was_training)
    expected = (len(batch), int(num_classes))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected or not out.is_floating_point():
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ConfigError(
            f"{spec.key} returns {got} for a batch shaped {tuple(batch.shape)}; expected float logits shaped "
            f"{expected} (batch, num_classes={num_classes})"
        )
    return built


def count_parameters(model: nn.Module) -> int:
    """Total number of scalar parameters in `model` (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
