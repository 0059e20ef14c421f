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
TRAINABLE = [n for n in NAMES if "trainable" in METHODS[n].params.model_fields]
TINY = {"epochs": 2, "batch_size": 64, "noise_batch": 16}  # applied where the method has the field (UNSIR: noise per class)
# Methods that change the weights before any epoch runs (EU-k re-initialises its blocks), so zero epochs
# is not "no update" for them.
CHANGES_BEFORE_TRAINING = {"eu_k"}
# Methods whose documented defaults update with BatchNorm in eval mode (none so far; name them here).
EVAL_MODE_UPDATES: set[str] = set()
# Methods whose inner search scores the model in eval mode with gradients on, by design (GLI's perturbation,
# UNSIR's per-batch noise); tests/test_methods_seed001.py checks that their update steps run in train mode.
EVAL_MODE_SEARCH = {"gli", "unsir_instance"}
# One-shot methods that edit the weights without any forward pass of their own (seed 003's SSD, Fisher).
NO_FORWARD_PASS = {"ssd", "ssd_retain", "fisher_prune_naive", "fisher_forgetting"}


@pytest.fixture(scope="module")
def tiny():
    """200 digits training examples (20 to forget), a small CNN briefly trained on them, 60 val examples."""
    ds = load_dataset("digits")
    data = ds.train.take(ds.train.ids()[:200])
    forget_ids = data.ids()[::10]
    forget, retain = data.take(forget_ids), data.drop(forget_ids)
    spec = ModelSpec("small_cnn", ds.num_classes, ds.in_channels, ds.mean, ds.std)
    model = create_model(spec, seed=0)
    recipe = Recipe(epochs=2, lr=0.05, batch_size=64)
    train_model(model, data, recipe, seed=0)
    val = ds.val.take(ds.val.ids()[:60])
    return model.state_dict(), spec, forget, retain, recipe, val


def params_for(name: str, **override) -> dict:
    """Tiny settings: TINY where the method has the field, and every other '*epochs' count capped at
    `epochs` (a preset's 60 fine-tune epochs become 2), then the overrides."""
    fields = METHODS[name].params.model_fields
    out = {k: v for k, v in TINY.items() if k in fields}
    cap = override.get("epochs", TINY["epochs"])
    for key, info in fields.items():
        if key.endswith("epochs") and key != "epochs" and isinstance(info.default, int):
            out[key] = min(info.default, cap)
    out.update({k: v for k, v in override.items() if k in fields})
    return out


def parent_of(tiny):
    """A model holding the tiny parent's weights (what the caller of a method loads from a checkpoint)."""
    state, spec = tiny[0], tiny[1]
    parent = create_model(spec)
    parent.load_state_dict(state)
    return parent


def context(tiny, seed: int = 0) -> UnlearnContext:
    _, spec, _, _, recipe, val = tiny
    return UnlearnContext(seed=seed, recipe=recipe, fresh_model=lambda: create_model(spec, seed=seed), val=val)


def run(name: str, tiny, seed: int = 0, forget: Split | None = None, retain: Split | None = None,
        model: torch.nn.Module | None = None, ctx: UnlearnContext | None = None, **override):
    """Run `name` on `model` itself (a fresh parent by default): the caller's copy is the only copy, as in the
    task layer. Returns (the model given, the result, the given model's state before)."""
    _, _, f, r, _, _ = tiny
    given = parent_of(tiny) if model is None else model
    before = copy.deepcopy(given.state_dict())
    out = run_method(name, params_for(name, **override), given, f if forget is None else forget,
                     r if retain is None else retain, context(tiny, seed) if ctx is None else ctx)
    return given, out, before


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


def _storages(module: torch.nn.Module) -> dict[int, str]:
    return {t.untyped_storage().data_ptr(): k for k, t in module.state_dict(keep_vars=True).items() if t.numel()}


@pytest.mark.parametrize("name", NAMES)
def test_returns_the_updated_model_without_aliasing(name, tiny):
    """Methods update the model they are given in place (the caller passes its own copy) or return a new
    one and leave the given model alone; either way the result's tensors are its own and finite, and no
    freeze leaks out (every parameter still requires grad)."""
    ctx = context(tiny)
    given, out, before = run(name, tiny, ctx=ctx)
    if out is not given:  # a new model (e.g. retrain): the given one must be untouched, nothing shared
        assert same(given.state_dict(), before), f"{name} returned a new model but also changed the given one"
        shared = set(_storages(out)) & set(_storages(given))
        assert not shared, f"{name}: the new model shares storage with the given one"
    after = out.state_dict()
    assert {k for k in after if not is_activation_mask(k)} == before.keys()  # activation_pruning adds masks
    for k, v in after.items():
        assert torch.isfinite(v.float()).all(), f"{name}: non-finite {k}"
    ptrs = [t.untyped_storage().data_ptr() for t in out.state_dict(keep_vars=True).values() if t.numel()]
    assert len(ptrs) == len(set(ptrs)), f"{name}: two entries of the returned state share storage"
    assert all(q.requires_grad for q in out.parameters()), f"{name}: a freeze leaked out of the method"
    # nothing the method leaves behind (its stats, its prepared state: teachers, masks, best-state copies)
    # holds the returned weights' storage, so later edits of one cannot change the other
    left = [t for t in list((ctx.prepared or {}).values()) + list(ctx.stats.values()) if isinstance(t, torch.Tensor)]
    left += [t for v in ctx.stats.values() if isinstance(v, dict) for t in v.values() if isinstance(t, torch.Tensor)]
    held = {t.untyped_storage().data_ptr() for t in left if t.numel()}
    assert not held & set(ptrs), f"{name}: the returned weights share storage with what the method left in ctx"


@pytest.mark.parametrize("name", SGD_METHODS)
def test_update_reaches_the_returned_model(name, tiny):
    """A method that trains, given a forget set, returns parameters that differ from the parent's (seed
    004's deep-copied optimizer stepped copies of the weights and returned the model unchanged)."""
    given, out, before = run(name, tiny)
    start = {k: v for k, v in before.items() if k in dict(out.named_parameters())}
    moved = [k for k, q in out.named_parameters() if not torch.equal(q.detach(), start[k])]
    assert moved, f"{name}: no parameter of the returned model changed"


@pytest.mark.parametrize("name", TRAINABLE)
def test_trainable_set_is_honoured(name, tiny):
    """With only the head trainable, every other parameter and buffer is bit-identical afterwards, the head
    moved, and the model's requires_grad flags are as they were."""
    from rumflow.models import blocks

    given = parent_of(tiny)
    head = {id(t) for t in list(dict(blocks(given))["head"].parameters()) + list(dict(blocks(given))["head"].buffers())}
    names = {id(t): k for k, t in given.state_dict(keep_vars=True).items()}
    head_keys = {names[i] for i in head}
    _, out, before = run(name, tiny, model=given, trainable=("head",))
    after = out.state_dict()
    frozen = [k for k in before if k not in head_keys]
    changed = [k for k in frozen if not torch.equal(after[k], before[k])]
    assert not changed, f"{name}: frozen entries changed: {changed[:5]}"
    assert any(not torch.equal(after[k], before[k]) for k in head_keys), f"{name}: the head did not move"
    assert all(q.requires_grad for q in out.parameters())


@pytest.mark.parametrize("name", [n for n in NAMES if n != "none"])
def test_train_mode_for_updates_and_eval_mode_on_return(name, tiny):
    """Every gradient-enabled forward pass of the method runs BatchNorm in train mode (seed 000's Alg. 3
    and 001's fine-tune trained in eval mode), and the returned model is in eval mode."""
    from rumflow.methods.registry import prepare_method

    given = parent_of(tiny)
    over = {"trainable": None, "last_k": None} if name in TRAINABLE else {}
    ctx = context(tiny)
    _, _, f, r, _, _ = tiny
    ctx.prepared = prepare_method(name, params_for(name, **over), given, f, r, ctx)  # masks: eval by design
    seen: list[bool] = []
    bns = [m for m in given.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(m.training) if torch.is_grad_enabled() else None)
             for m in bns]
    try:
        _, out, _ = run(name, tiny, model=given, ctx=ctx, **over)
    finally:
        for h in hooks:
            h.remove()
    assert not any(m.training for m in out.modules()), f"{name}: the returned model is not in eval mode"
    if name in EVAL_MODE_UPDATES | NO_FORWARD_PASS or out is not given:
        return
    assert seen, f"{name}: no gradient-enabled forward pass through the given model"
    assert all(seen) or (name in EVAL_MODE_SEARCH and any(seen)), \
        f"{name}: {seen.count(False)} of {len(seen)} BatchNorm calls with grad ran in eval mode"


@pytest.mark.parametrize("name", NAMES)
def test_reproducible(name, tiny):
    _, a, _ = run(name, tiny, seed=3)
    _, b, _ = run(name, tiny, seed=3)
    assert same(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("name", SGD_METHODS)
def test_different_seeds_differ(name, tiny):
    """Every SGD method is stochastic through its shuffling (small batches so each set has several)."""
    _, a, _ = run(name, tiny, seed=1, batch_size=16, epochs=1)
    _, b, _ = run(name, tiny, seed=2, batch_size=16, epochs=1)
    assert not same(a.state_dict(), b.state_dict()), f"{name}: seeds 1 and 2 gave the same weights"


@pytest.mark.parametrize("name", [n for n in SGD_METHODS if n not in CHANGES_BEFORE_TRAINING])
def test_zero_epochs_change_nothing(name, tiny):
    _, out, before = run(name, tiny, epochs=0)  # params_for caps every '*epochs' count at 0 too
    assert same(out.state_dict(), before)


@pytest.mark.parametrize("name", [n for n in NAMES if "lr" in METHODS[n].params.model_fields])
def test_larger_lr_moves_weights_further(name, tiny):
    lr = METHODS[name].params.model_fields["lr"].default
    _, small, before = run(name, tiny, lr=lr / 10)
    _, large, _ = run(name, tiny, lr=lr)
    keys = dict(small.named_parameters())  # parameters only: BatchNorm's running stats do not depend on lr
    if name in CHANGES_BEFORE_TRAINING:  # measure from where training starts (EU-k: the re-initialised blocks)
        before = run(name, tiny, epochs=0)[1].state_dict()
    start = {k: before[k] for k in keys}
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
    _, _, forget, retain, _, _ = tiny
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
    """SPEC's methods keep RUM's machinery; the seeds' methods and presets keep their documents' values."""
    for name in [n for n in SGD_METHODS if METHODS[n].source.startswith("SPEC")]:
        p = validate_params(name, {})
        assert isinstance(p, MethodParams)
        assert (p.momentum, p.weight_decay, p.batch_size) == (0.9, 5e-4, 256)
