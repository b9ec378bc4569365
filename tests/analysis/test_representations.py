import pytest
import torch

from mamlab.analysis.representations import (
    capture_representations,
    head_parameter_names,
    layer_label,
    parametrized_layers,
    relative_parameter_change,
    representation_layers,
)
from mamlab.core.params import parameters_of
from mamlab.errors import MamlabError
from mamlab.models import MLP, Conv4


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(1, 1, hidden=(40, 40))


def test_mlp_layers_names_and_shapes():
    model = _mlp()
    x = torch.linspace(-5, 5, 7).view(7, 1)
    reps = capture_representations(model, parameters_of(model), x)
    assert list(reps) == ["0", "1", "2", "3", "4"]
    assert [tuple(r.shape) for r in reps.values()] == [(7, 40), (7, 40), (7, 40), (7, 40), (7, 1)]
    assert [layer_label(model, n) for n in reps] == ["0 Linear", "1 ReLU", "2 Linear", "3 ReLU", "4 Linear"]
    assert torch.equal(reps["4"], model(x).detach())  # the head's output is the network's output
    assert torch.equal(reps["1"], torch.relu(reps["0"]))
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_conv4_layers_names_and_shapes():
    torch.manual_seed(0)
    model = Conv4(5, hidden=8)
    reps = capture_representations(model, None, torch.rand(6, 1, 28, 28))
    assert list(reps) == list(representation_layers(model))
    assert list(reps)[0] == "features.0" and list(reps)[-1] == "head"
    assert reps["features.0"].shape == (6, 8, 28, 28)
    assert reps["features.14"].shape == (6, 8, 3, 3)  # fourth conv, before its pooling
    assert reps["head"].shape == (6, 5)
    assert head_parameter_names(model) == ["head.weight", "head.bias"]
    assert list(parametrized_layers(model))[-1] == "head"


def test_capture_uses_the_given_parameters_not_the_models():
    model = _mlp()
    x = torch.randn(5, 1)
    shifted = {k: p + 1.0 for k, p in parameters_of(model).items()}
    own = capture_representations(model, None, x)
    other = capture_representations(model, shifted, x)
    assert not torch.equal(own["4"], other["4"])
    head_only = capture_representations(model, {"4.bias": shifted["4.bias"]}, x)  # partial dict (ANIL)
    assert torch.equal(head_only["2"], own["2"]) and torch.allclose(head_only["4"], own["4"] + 1.0)


def test_capture_errors_are_one_line():
    model = _mlp()
    with pytest.raises(MamlabError, match="not modules") as e:
        capture_representations(model, None, torch.randn(3, 1), layers=["nope"])
    assert "\n" not in str(e.value)
    batched = {k: p.unsqueeze(0).expand(2, *p.shape) for k, p in parameters_of(model).items()}
    with pytest.raises(MamlabError, match="one task's parameters"):
        capture_representations(model, batched, torch.randn(3, 1))


def test_relative_parameter_change_known_answer():
    before = {"a.weight": torch.tensor([3.0, 0.0]), "a.bias": torch.tensor([4.0]), "b.weight": torch.ones(2)}
    after = {"a.weight": torch.tensor([3.0, 0.5]), "a.bias": torch.tensor([4.0])}
    rel = relative_parameter_change(before, after, {"a": ["a.weight", "a.bias"], "b": ["b.weight"]})
    assert rel == {"a": pytest.approx(0.1), "b": 0.0}  # ‖(0, .5, 0)‖ / ‖(3, 0, 4)‖; b not adapted
