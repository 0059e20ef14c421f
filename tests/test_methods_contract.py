"""The contract every registered unlearning method keeps (new methods are covered automatically)."""
from __future__ import annotations

import copy

import pytest
import torch

from rumflow.errors import ConfigError, DivergenceError
from rumflow.data import Split, load_dataset
from rumflow.methods import METHODS, UnlearnContext, describe_methods, run_method, validate_params
from rumflow.methods.registry import MethodParams
from rumflow.models import ModelSpec, create_model, is_activation_mask
from rumflow.training import Recipe, train_model

NAMES = sorted(METHODS)
SGD_METHODS = [n for n in NAMES if "epochs" in METHODS[n].params.model_fields]
TINY = {"epochs": 2, "batch_size": 64}  # applied where the method has the field


@pytest.fixture(scope="module")
def tiny():
    """200 digits training examples (20 to forget), a small CNN briefly trained on them."""
    ds = load_dataset("digits")
    data = ds.train.take(ds.train.ids()[:200])
    forget_ids = data.ids()[::10]
    forget, retain = data.take(forget_ids), data.drop(forget_ids)
    spec = ModelSpec("small_cnn", ds.num_classes, ds.in_channels, ds.mean, ds.std)
    model = create_model(spec, seed=0)
    recipe = Recipe(epochs=2, lr=0.05, batch_size=64)
    train_model(model, data, recipe, seed=0)
    return model.state_dict(), spec, forget, retain, recipe


def params_for(name: str, **override) -> dict:
    fields = METHODS[name].params.model_fields
    return {k: v for k, v in {**TINY, **override}.items() if k in fields}


def run(name: str, tiny, seed: int = 0, forget: Split | None = None, retain: Split | None = None, **override):
    """Run `name` on a fresh copy of the parent; returns (parent, result, parent state before)."""
    state, spec, f, r, recipe = tiny
    parent = create_model(spec)
    parent.load_state_dict(state)
    before = copy.deepcopy(parent.state_dict())
    ctx = UnlearnContext(seed=seed, recipe=recipe, fresh_model=lambda: create_model(spec, seed=seed))
    out = run_method(name, params_for(name, **override), copy.deepcopy(parent),
                     f if forget is None else forget, r if retain is None else retain, ctx)
    return parent, out, before


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def distance(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_are_documented_and_defaults_valid(name):
    model = METHODS[name].params
    for key, info in model.model_fields.items():
        assert info.description, f"{name}.{key} has no description"
    validate_params(name, {})  # the registered defaults are valid
    assert METHODS[name].summary


@pytest.mark.parametrize("name", NAMES)
def test_leaves_parent_untouched_and_returns_finite_weights(name, tiny):
    parent, out, before = run(name, tiny)
    assert same(parent.state_dict(), before)
    after = out.state_dict()
    assert {k for k in after if not is_activation_mask(k)} == before.keys()  # activation_pruning adds masks
    for k, v in after.items():
        assert torch.isfinite(v.float()).all(), f"{name}: non-finite {k}"
        if v.numel():
            assert v.data_ptr() != parent.state_dict()[k].data_ptr(), f"{name}: {k} shares storage with the parent"


@pytest.mark.parametrize("name", NAMES)
def test_reproducible(name, tiny):
    _, a, _ = run(name, tiny, seed=3)
    _, b, _ = run(name, tiny, seed=3)
    assert same(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("name", SGD_METHODS)
def test_zero_epochs_change_nothing(name, tiny):
    _, out, before = run(name, tiny, epochs=0)
    assert same(out.state_dict(), before)


@pytest.mark.parametrize("name", [n for n in NAMES if "lr" in METHODS[n].params.model_fields])
def test_larger_lr_moves_weights_further(name, tiny):
    lr = METHODS[name].params.model_fields["lr"].default
    parent, small, _ = run(name, tiny, lr=lr / 10)
    _, large, _ = run(name, tiny, lr=lr)
    start = dict(parent.named_parameters())  # parameters only: BatchNorm's running stats do not depend on lr
    assert 0 < distance(dict(small.named_parameters()), start) < distance(dict(large.named_parameters()), start)


def _violations(info) -> list:
    """Values outside a field's declared bounds."""
    out = []
    for m in info.metadata:
        if getattr(m, "ge", None) is not None:
            out.append(m.ge - 1)
        if getattr(m, "gt", None) is not None:
            out.append(m.gt)
        if getattr(m, "le", None) is not None:
            out.append(m.le + 1)
        if getattr(m, "lt", None) is not None:
            out.append(m.lt)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_invalid_hyperparameters_raise_config_error(name):
    fields = METHODS[name].params.model_fields
    with pytest.raises(ConfigError, match=f"method '{name}' has no hyperparameter 'no_such_knob'"):
        validate_params(name, {"no_such_knob": 1})
    checked = 0
    for key, info in fields.items():
        for bad in _violations(info):
            with pytest.raises(ConfigError, match=rf"method '{name}': hyperparameter '{key}' .*got {bad!r}"):
                validate_params(name, {key: bad})
            checked += 1
    if "lr" in fields:
        with pytest.raises(ConfigError, match="'lr' input should be greater than 0"):
            validate_params(name, {"lr": -1})
    if "alpha" in fields:
        with pytest.raises(ConfigError, match="'alpha' input should be less than or equal to 1"):
            validate_params(name, {"alpha": 1.5})
    assert checked or not fields


@pytest.mark.parametrize("name", [n for n in NAMES if n != "retrain"])
def test_empty_forget_set_leaves_model_unchanged(name, tiny):
    empty = tiny[2].take([])
    _, out, before = run(name, tiny, forget=empty)
    assert same(out.state_dict(), before)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"])
def test_non_finite_loss_raises_divergence(name, tiny):
    _, _, forget, retain, _ = tiny
    poison = lambda s: Split(s.x.clone().index_fill_(0, torch.tensor([0]), float("nan")), s.y, s.example_id)
    with pytest.raises(DivergenceError, match="diverged|non-finite"):
        run(name, tiny, forget=poison(forget), retain=poison(retain), epochs=1)


def test_describe_methods_lists_every_method_and_hyperparameter():
    text = describe_methods()
    for name, method in METHODS.items():
        assert f"{name}: " in text
        for key, info in method.params.model_fields.items():
            assert f"{key} = {info.default!r}" in text
    assert "no hyperparameters" in text


def test_shared_hyperparameters_keep_rum_machinery():
    for name in SGD_METHODS:
        p = validate_params(name, {})
        assert isinstance(p, MethodParams)
        assert (p.momentum, p.weight_decay, p.batch_size) == (0.9, 5e-4, 256)
