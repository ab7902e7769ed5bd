"""Model zoo: exact MNIST parameter counts, output shapes, dropout modes, errors, seeded init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raypfl.errors import ConfigError
from raypfl.models.zoo import MODELS, build_model, count_parameters

torch.set_num_threads(1)

MNIST_COUNTS = {
    "mlp": 199_210,
    "cnn": 1_663_370,
    "keras_cnn": 600_810,
    "tiny_cnn": 28_938,
    "torch_example_cnn": 21_840,
    "narrow_cnn": 34_318,
    "deep_mlp": 366_730,
    "logreg": 7_850,
    "lenet": 44_426,  # 156 + 2,416 (convs) + 30,840 + 10,164 + 850 (FC 120, 84, 10)
}
DROPOUT_MODELS = ["keras_cnn", "torch_example_cnn"]


def test_every_registered_model_has_an_expected_count():
    assert set(MODELS) == set(MNIST_COUNTS)


@pytest.mark.parametrize("name", list(MODELS))
def test_mnist_count_and_output_shape(name):
    model = build_model(name, (1, 28, 28), 10)
    assert isinstance(model, nn.Module)
    assert count_parameters(model) == MNIST_COUNTS[name]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    assert out.dtype == torch.float32


def test_defaults_are_mnist():
    assert count_parameters(build_model("cnn")) == MNIST_COUNTS["cnn"]


@pytest.mark.parametrize("name", list(MODELS))
def test_cifar10_shape(name):
    model = build_model(name, (3, 32, 32), 10)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", list(MODELS))
def test_num_classes(name):
    model = build_model(name, (1, 28, 28), 7)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 7)


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_are_logits_not_probabilities(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(4, 1, 28, 28))
    # softmax rows would sum to 1, log_softmax rows would logsumexp to 0
    assert not torch.allclose(out.sum(dim=1), torch.ones(4), atol=1e-3)
    assert not torch.allclose(out.logsumexp(dim=1), torch.zeros(4), atol=1e-3)


@pytest.mark.parametrize("name", DROPOUT_MODELS)
def test_dropout_follows_train_and_eval(name):
    torch.manual_seed(0)
    model = build_model(name)
    assert any(isinstance(m, (nn.Dropout, nn.Dropout2d)) for m in model.modules())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(set(MODELS) - set(DROPOUT_MODELS)))
def test_models_without_dropout_are_deterministic_in_train_mode(name):
    model = build_model(name).train()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
    assert torch.equal(a, b)


def test_unknown_name_raises_config_error_listing_choices():
    with pytest.raises(ConfigError) as info:
        build_model("resnet9000")
    msg = str(info.value)
    assert "model=resnet9000" in msg
    assert "choose from" in msg
    for name in MODELS:
        assert name in msg


def test_too_small_input_is_a_config_error():
    with pytest.raises(ConfigError, match="in_shape"):
        build_model("keras_cnn", (1, 4, 4))


@pytest.mark.parametrize("name", list(MODELS))
def test_same_seed_same_initial_weights(name):
    torch.manual_seed(123)
    a = build_model(name).state_dict()
    torch.manual_seed(123)
    b = build_model(name).state_dict()
    torch.manual_seed(124)
    c = build_model(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_count_parameters_counts_frozen_parameters_too():
    model = build_model("tiny_cnn")
    for p in model.parameters():
        p.requires_grad_(False)
    assert count_parameters(model) == MNIST_COUNTS["tiny_cnn"]
