"""Seed 000's methods (the gradient-ascent engine, its presets, fine-tuning variants) and CF-k / EU-k.

Each bug test would fail on the behaviour of the seed's code (SEED_METHODS.md section 0) and passes on
ours; each hand computation redoes an algorithm's defining step with plain torch.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from rumflow.data import load_dataset
from rumflow.errors import ConfigError
from rumflow.methods import UnlearnContext, run_method, validate_params
from rumflow.methods.layers import choose_blocks
from rumflow.models import ModelSpec, blocks, create_model
from rumflow.training import Recipe, accuracy, train_model

PLAIN = {"momentum": 0.0, "weight_decay": 0.0}  # plain SGD: one step is exactly -lr * grad


@pytest.fixture(scope="module")
def setup():
    """200 digits examples (20 to forget), a small CNN briefly trained on them, 60 validation examples."""
    ds = load_dataset("digits")
    data = ds.train.take(ds.train.ids()[:200])
    fid = data.ids()[::10]
    spec = ModelSpec("small_cnn", ds.num_classes, ds.in_channels, ds.mean, ds.std)
    model = create_model(spec, seed=0)
    train_model(model, data, Recipe(epochs=3, lr=0.05, batch_size=64), seed=0)
    return model.state_dict(), spec, data.take(fid), data.drop(fid), ds.val.take(ds.val.ids()[:60])


def parent(setup) -> torch.nn.Module:
    model = create_model(setup[1])
    model.load_state_dict(setup[0])
    return model


def context(setup, seed: int = 0, val: bool = True) -> UnlearnContext:
    spec = setup[1]
    return UnlearnContext(seed=seed, recipe=Recipe(1, 0.1, 64), fresh_model=lambda: create_model(spec, seed=seed),
                          val=setup[4] if val else None)


def run(name: str, setup, ctx: UnlearnContext | None = None, model: torch.nn.Module | None = None, **params):
    """Run `name` on a fresh parent; returns (the unlearned model, the context)."""
    ctx = context(setup) if ctx is None else ctx
    out = run_method(name, params, parent(setup) if model is None else model, setup[2], setup[3], ctx)
    return out, ctx


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def block_keys(model: torch.nn.Module, name: str) -> set[str]:
    """State-dict keys of block `name`."""
    ids = {id(t) for t in list(dict(blocks(model))[name].parameters()) + list(dict(blocks(model))[name].buffers())}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in ids}


# ------------------------------------------------------------------ hand computations


def test_one_reverse_step_is_minus_scale_times_the_ce_gradient(setup):
    """pattern forget, one batch holding all of D_f, plain SGD: theta' = theta + lr * scale * grad CE(D_f)."""
    _, _, forget, _, _ = setup
    lr, scale = 0.05, 0.7
    ref = parent(setup).train()
    ce = F.cross_entropy(ref(forget.x), forget.y)
    grads = torch.autograd.grad(ce, list(ref.parameters()))
    expected = {k: q.detach() + lr * scale * g for (k, q), g in zip(ref.named_parameters(), grads)}
    out, _ = run("ascent_schedule", setup, pattern="forget", epochs=1, batch_size=len(forget), lr=lr,
                 scale=scale, **PLAIN)
    for k, q in out.named_parameters():
        assert torch.allclose(q, expected[k], atol=1e-6), k


def test_cf_k_step_moves_only_the_head_by_its_ce_gradient(setup):
    """CF-1 on small_cnn, one full batch of plain SGD: the head moves by -lr * grad CE(D_r) computed with the
    frozen blocks in eval mode; every other entry (weights and BatchNorm statistics) is bit-identical."""
    _, _, _, retain, _ = setup
    lr = 0.1
    ref = parent(setup).eval()
    head = dict(blocks(ref))["head"]
    head.train()
    ce = F.cross_entropy(ref(retain.x), retain.y)
    head_params = list(head.parameters())
    grads = torch.autograd.grad(ce, head_params)
    expected = [q.detach() - lr * g for q, g in zip(head_params, grads)]
    before = copy.deepcopy(parent(setup).state_dict())
    out, _ = run("cf_k", setup, last_k=1, epochs=1, batch_size=len(retain), lr=lr, **PLAIN)
    for q, e in zip(dict(blocks(out))["head"].parameters(), expected):
        assert torch.allclose(q, e, atol=1e-6)
    after = out.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k not in block_keys(out, "head"))


def test_cosine_finetune_halves_the_lr_in_the_second_of_two_epochs(setup):
    """finetune schedule cosine (T_max = epochs, stepped per epoch): epochs use lr, then lr*(1+cos(pi/2))/2."""
    _, _, _, retain, _ = setup
    lr = 0.05
    ref = parent(setup).train()
    for step_lr in (lr, lr * (1 + math.cos(math.pi / 2)) / 2):
        ce = F.cross_entropy(ref(retain.x), retain.y)
        grads = torch.autograd.grad(ce, list(ref.parameters()))
        with torch.no_grad():
            for q, g in zip(ref.parameters(), grads):
                q -= step_lr * g
    out, _ = run("finetune", setup, schedule="cosine", epochs=2, batch_size=len(retain), lr=lr, **PLAIN)
    for (k, q), r in zip(out.named_parameters(), ref.parameters()):
        assert torch.allclose(q, r, atol=1e-5), k


def test_reverse_scale_schedules(setup):
    """constant, linear max*e/E and quadratic max*(e/E)^2, e = 0..E-1 (never reaching max, as in 000)."""
    for schedule, expected in [("constant", [0.8] * 4), ("linear", [0.0, 0.2, 0.4, 0.6]),
                               ("quadratic", [0.0, 0.05, 0.2, 0.45])]:
        _, ctx = run("ascent_schedule", setup, schedule=schedule, scale=0.8, epochs=4, batch_size=64)
        assert ctx.stats["scale"] == pytest.approx(expected), schedule


@pytest.mark.parametrize("options,examples", [
    # Alg. 5: min(23 retain batches, 3 forget batches) = 3 pairs of a retain batch of 8 and a forget batch
    ({"steps": "min"}, 3 * 8 + 20),
    # Hybrid 3/4: every retain batch, 2 forget steps after each; D_f (8, 8, 4) runs out after 2 retain steps
    ({"steps": "retain", "forget_steps": 2}, 180 + 20),
    # cycled: 23 retain steps x 2 forget batches = 46 batches = 15 passes over D_f and one more batch of 8
    ({"steps": "retain", "forget_steps": 2, "cycle_forget": True}, 180 + 15 * 20 + 8),
    # half the retain budget: 90 of 180 per epoch, with one pass over D_f after them (pattern epoch)
    ({"pattern": "epoch", "retain_fraction": 0.5}, 90 + 20),
    # a retain pass after every epoch on top of the pattern
    ({"pattern": "forget", "intermediate_every": 1}, 20 + 180),
])
def test_alternation_patterns_visit_the_documented_examples(setup, options, examples):
    _, ctx = run("ascent_schedule", setup, **{"pattern": "batch", "epochs": 1, "batch_size": 8, **options})
    assert ctx.stats["examples"] == examples


def test_final_finetune_keeps_the_loop_optimizer_momentum(setup):
    """000 Alg. 6 fine-tunes with the loop's optimizer. One ascent step on all of D_f, then one retain step on
    all of D_r, SGD momentum mu: theta2 = theta1 - lr * (mu * g1 + g2), g1 = grad(-scale * CE_f) at theta0,
    g2 = grad CE_r at theta1 (a fresh optimizer would drop mu * g1)."""
    _, _, forget, retain, _ = setup
    lr, mu, scale = 0.05, 0.9, 0.5
    ref = parent(setup).train()
    g1 = torch.autograd.grad(-scale * F.cross_entropy(ref(forget.x), forget.y), list(ref.parameters()))
    with torch.no_grad():
        for q, g in zip(ref.parameters(), g1):
            q -= lr * g
    g2 = torch.autograd.grad(F.cross_entropy(ref(retain.x), retain.y), list(ref.parameters()))
    with torch.no_grad():
        for q, a, b in zip(ref.parameters(), g1, g2):
            q -= lr * (mu * a + b)
    out, _ = run("ascent_schedule", setup, pattern="forget", epochs=1, final_epochs=1, batch_size=len(retain),
                 lr=lr, momentum=mu, weight_decay=0.0, scale=scale)
    for (k, q), r in zip(out.named_parameters(), ref.parameters()):
        assert torch.allclose(q, r, atol=1e-5), k


# ------------------------------------------------------------------ bugs of the seed's code (section 0)


def test_best_state_is_a_real_copy_of_the_selected_epoch(setup):
    """000 Hybrid 3/4 kept `best = net.state_dict()` (a reference), so the 'best' state was the last one.
    Ours returns the weights of the selected epoch exactly: the same run stopped after that epoch."""
    opts = {"pattern": "forget", "scale": 3.0, "epochs": 4, "batch_size": 8, "lr": 0.02, "select": "val_acc"}
    out, ctx = run("ascent_schedule", setup, **opts)
    accs, chosen = ctx.stats["val_acc"], ctx.stats["selected_epoch"]
    assert len(accs) == 4 and accs[chosen] == max(accs)
    assert chosen < 3, "the setting must make an earlier epoch the best (ascent at scale 3 lowers val accuracy)"
    stopped, _ = run("ascent_schedule", setup, **{**opts, "epochs": chosen + 1, "select": "none"})
    assert same(out.state_dict(), stopped.state_dict())
    last, _ = run("ascent_schedule", setup, **{**opts, "select": "none"})
    assert not same(out.state_dict(), last.state_dict())
    assert accuracy(out, setup[4]) == accs[chosen]  # selected on the validation split


def test_selection_is_off_without_a_validation_split(setup):
    opts = {"pattern": "forget", "scale": 3.0, "epochs": 3, "batch_size": 8, "lr": 0.02}
    blind, ctx = run("ascent_schedule", setup, ctx=context(setup, val=False), select="val_acc", **opts)
    plain, _ = run("ascent_schedule", setup, select="none", **opts)
    assert same(blind.state_dict(), plain.state_dict()) and ctx.stats["val_acc"] == []


def test_unfrozen_blocks_join_the_optimizer(setup):
    """000 Hybrid 3/4 set requires_grad=True after building the optimizer over the trainable parameters, so
    the unfrozen layers never moved. Ours adds them as a parameter group: block3 moves from the unfreeze on,
    block1 and block2 stay bit-identical."""
    opts = {"pattern": "forget", "epochs": 2, "batch_size": 8, "lr": 0.05, "last_k": 1}
    before = parent(setup).state_dict()
    opened, ctx = run("ascent_schedule", setup, unfreeze=("block3",), unfreeze_at=0.5, **opts)
    closed, _ = run("ascent_schedule", setup, **opts)
    after, shut = opened.state_dict(), closed.state_dict()
    b3 = [k for k in block_keys(opened, "block3") if "weight" in k or "bias" in k]
    assert ctx.stats["unfrozen"] == ["block3"]
    assert any(not torch.equal(after[k], before[k]) for k in b3)
    assert all(torch.equal(shut[k], before[k]) for k in b3)
    for k in block_keys(opened, "block1") | block_keys(opened, "block2"):
        assert torch.equal(after[k], before[k]), k


def test_a_freeze_does_not_leak_into_the_next_method(setup):
    """000's selective_fine_tune left requires_grad=False on every later algorithm's model. After cf_k the
    flags are back, and a following finetune moves the first block again."""
    model = parent(setup)
    before = copy.deepcopy(model.state_dict())
    out, _ = run("cf_k", setup, model=model, last_k=1, epochs=1, batch_size=64)
    assert out is model and all(q.requires_grad for q in out.parameters())
    assert all(torch.equal(out.state_dict()[k], before[k]) for k in block_keys(out, "block1"))
    out, _ = run("finetune", setup, model=out, epochs=1, batch_size=64)
    assert any(not torch.equal(out.state_dict()[k], before[k]) for k in block_keys(out, "block1"))


def test_each_method_starts_from_the_model_it_is_given(setup):
    """000 chained every algorithm on one object. Two runs on two parents give the same weights: a method
    keeps no state between calls (the caller's copy is its only input)."""
    a, _ = run("interleaved_ascent", setup, epochs=2, batch_size=32)
    run("finetune", setup, model=a, epochs=1)  # changing one result ...
    b, _ = run("interleaved_ascent", setup, epochs=2, batch_size=32)
    c, _ = run("interleaved_ascent", setup, epochs=2, batch_size=32)
    assert same(b.state_dict(), c.state_dict())  # ... leaves the next call's start alone


@pytest.mark.parametrize("name,params", [
    ("finetune_then_ascent", {"pre_epochs": 0, "epochs": 1, "batch_size": 8}),  # 000 Alg. 3: eval mode
    ("finetune_benchmark", {"epochs": 1}),                                     # 001 benchmark FT: eval mode
])
def test_updates_run_in_train_mode(setup, name, params):
    """The seeds ran these updates in eval mode (BatchNorm frozen). Ours updates BatchNorm's running
    statistics of the trainable blocks, as train mode does."""
    before = parent(setup).state_dict()
    out, _ = run(name, setup, **params)
    key = sorted(k for k in block_keys(out, "block3") if k.endswith("running_mean"))[0]
    assert not torch.equal(out.state_dict()[key], before[key])


# ------------------------------------------------------------------ EU-k, CF-k, blocks


def test_eu_k_reinitialises_parameters_and_buffers_from_the_seeded_fresh_model(setup):
    """With 0 epochs, EU-2 leaves the reset visible: block3 and head hold the fresh init's weights AND its
    BatchNorm statistics (SCRUB's code kept the old statistics), the other blocks the parent's."""
    model = parent(setup)
    before = copy.deepcopy(model.state_dict())
    ctx = context(setup, seed=5)
    out, _ = run("eu_k", setup, ctx=ctx, model=model, last_k=2, epochs=0)
    fresh = ctx.fresh_model().state_dict()
    reset = block_keys(out, "block3") | block_keys(out, "head")
    assert any(k.endswith("running_var") for k in reset)
    for k, v in out.state_dict().items():
        assert torch.equal(v, fresh[k] if k in reset else before[k]), k
    other, _ = run("eu_k", setup, ctx=context(setup, seed=6), last_k=2, epochs=0)
    assert not torch.equal(other.state_dict()["1.12.weight"], out.state_dict()["1.12.weight"])


def test_eu_k_retrains_only_the_reset_blocks(setup):
    ctx = context(setup)
    out, _ = run("eu_k", setup, ctx=ctx, last_k=1, epochs=2, batch_size=32)
    before = parent(setup).state_dict()
    fresh = ctx.fresh_model().state_dict()
    head = block_keys(out, "head")
    after = out.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k not in head)
    assert all(not torch.equal(after[k], fresh[k]) for k in head)


def test_selective_finetune_is_layer4_and_fc_on_resnet18_and_the_last_two_blocks_elsewhere():
    p = validate_params("selective_finetune", {})
    for arch, channels, expected in [("resnet18", 3, ["layer4", "fc"]), ("small_cnn", 1, ["block3", "head"]),
                                     ("vgg16_bn", 3, ["block5", "head"])]:
        model = create_model(ModelSpec(arch, 10, channels, (0.0,) * channels, (1.0,) * channels), seed=0)
        assert [n for n, _ in choose_blocks(model, p.trainable, p.last_k)] == expected
    cf3 = validate_params("cf_k", {})
    model = create_model(ModelSpec("resnet18", 10, 3, (0.0,) * 3, (1.0,) * 3), seed=0)
    assert [n for n, _ in choose_blocks(model, cf3.trainable, cf3.last_k)] == ["layer3", "layer4", "fc"]


def test_trainable_names_win_over_last_k_and_bad_names_get_one_sentence(setup):
    model = parent(setup)
    assert [n for n, _ in choose_blocks(model, ("block1", "head"), 3)] == ["block1", "head"]
    with pytest.raises(ConfigError, match="model small_cnn has no block layer4; its blocks are: block1, "
                                          "block2, block3, head"):
        choose_blocks(model, ("layer4",), None)
    with pytest.raises(ConfigError, match="last_k 5 is more than the 4 blocks of model small_cnn"):
        choose_blocks(model, None, 5)
    with pytest.raises(ConfigError, match="has no block layer1"):
        run("ascent_schedule", setup, unfreeze=("layer1",), unfreeze_at=0.3, epochs=1)
    with pytest.raises(ConfigError, match="unfreeze names block3 but unfreeze_at is not set"):
        run("ascent_schedule", setup, unfreeze=("block3",), epochs=1)


def test_frozen_bn_train_lets_frozen_statistics_move_as_the_seeds_did(setup):
    before = parent(setup).state_dict()
    out, _ = run("cf_k", setup, last_k=1, epochs=1, frozen_bn="train")
    b1 = block_keys(out, "block1")
    weights = [k for k in b1 if k.endswith("weight")]
    stats = [k for k in b1 if k.endswith("running_mean")]
    assert all(torch.equal(out.state_dict()[k], before[k]) for k in weights)
    assert any(not torch.equal(out.state_dict()[k], before[k]) for k in stats)


# ------------------------------------------------------------------ presets = the notebook's calls


@pytest.mark.parametrize("name,expected", [
    ("finetune_cosine", {"lr": 0.001, "epochs": 100, "schedule": "cosine", "momentum": 0.9, "batch_size": 128}),
    ("finetune_benchmark", {"lr": 0.001, "epochs": 2, "momentum": 0.0, "weight_decay": 0.0, "batch_size": 64}),
    ("selective_finetune", {"last_k": 2, "epochs": 100, "schedule": "cosine", "lr": 0.001}),
    ("finetune_then_ascent", {"pre_epochs": 60, "epochs": 1, "pattern": "forget", "scale": 1.0, "last_k": 2}),
    ("alternating_epoch_ascent", {"pre_epochs": 50, "epochs": 50, "pattern": "epoch", "scale": 0.3}),
    ("interleaved_ascent", {"epochs": 100, "pattern": "batch", "steps": "min", "scale": 0.4}),
    ("interleaved_ascent_finetune", {"epochs": 100, "scale": 0.5, "final_epochs": 100}),
    ("hybrid_linear_ascent", {"epochs": 50, "scale": 0.6, "schedule": "linear", "final_epochs": 0}),
    ("hybrid_quadratic_ascent_finetune", {"epochs": 50, "scale": 0.8, "schedule": "quadratic", "final_epochs": 10}),
    ("hybrid_refined_ascent", {"epochs": 50, "scale": 1.0, "schedule": "quadratic", "forget_steps": 2,
                               "steps": "retain", "cycle_forget": False, "intermediate_every": 10,
                               "select": "val_acc", "final_epochs": 10}),
])
def test_presets_carry_the_documents_hyperparameters(name, expected):
    p = validate_params(name, {})
    assert {k: getattr(p, k) for k in expected} == expected
    if name.endswith("ascent") or "ascent_" in name:
        assert (p.lr, p.momentum, p.weight_decay, p.batch_size) == (0.001, 0.9, 5e-4, 128)


def test_label_smoothing_enters_the_finetune_loss(setup):
    """One full retain batch: the recorded loss is the parent's train-mode CE with label smoothing 0.2."""
    _, _, _, retain, _ = setup
    ref = parent(setup).train()
    with torch.no_grad():
        expected = float(F.cross_entropy(ref(retain.x), retain.y, label_smoothing=0.2))
        plain = float(F.cross_entropy(ref(retain.x), retain.y))
    _, ctx = run("finetune", setup, epochs=1, batch_size=len(retain), label_smoothing=0.2)
    assert ctx.stats["loss"] == [pytest.approx(expected, abs=1e-5)]
    assert abs(expected - plain) > 1e-3
