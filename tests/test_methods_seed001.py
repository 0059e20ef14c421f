"""Seed 001's methods (GLI, the benchmark NegGrad and SCRUB, UNSIR, Bad Teaching) and 003's Advanced NegGrad:
each defining step against a hand computation on a tiny linear model, and each document bug we fix pinned
(the test fails on the document's behaviour)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rumflow.data import Split, load_dataset
from rumflow.errors import ConfigError
from rumflow.methods import METHODS, UnlearnContext, run_method
from rumflow.methods.gli import distance_loss, gli_perturb, guide_weight
from rumflow.methods.parts import ForgetStream, forward_features, per_class_subset
from rumflow.methods.registry import prepare_method
from rumflow.methods.teachers import (bad_teacher_loss, distill_kl, kl_to_probs, load_teacher,
                                      random_teacher_state)
from rumflow.methods.unsir import class_noise, instance_noise
from rumflow.models import ModelSpec, create_model
from rumflow.training import Recipe, accuracy, batches_per_epoch, train_model

SENTINEL = 123.0  # a pixel value no digit has: marks forget examples as they pass through the model


# ------------------------------------------------------------------ fixtures and hand-computation helpers


@pytest.fixture(scope="module")
def tiny():
    """200 digits examples (20 to forget), a small CNN briefly trained on them, 60 validation examples."""
    ds = load_dataset("digits")
    data = ds.train.take(ds.train.ids()[:200])
    fid = data.ids()[::10]
    spec = ModelSpec("small_cnn", ds.num_classes, ds.in_channels, ds.mean, ds.std)
    model = create_model(spec, seed=0)
    train_model(model, data, Recipe(epochs=2, lr=0.05, batch_size=64), seed=0)
    return model.state_dict(), spec, data.take(fid), data.drop(fid), ds.val.take(ds.val.ids()[:60])


def fresh(setup) -> nn.Module:
    model = create_model(setup[1])
    model.load_state_dict(setup[0])
    return model


def context(setup, seed: int = 0, val: Split | None = None) -> UnlearnContext:
    spec = setup[1]
    return UnlearnContext(seed=seed, recipe=Recipe(1, 0.1, 64), fresh_model=lambda: create_model(spec, seed=seed),
                          val=val)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def marked(split: Split) -> Split:
    """`split` with its first pixel set to SENTINEL, so a hook can tell its examples apart."""
    x = split.x.clone()
    x[:, 0, 0, 0] = SENTINEL
    return Split(x, split.y, split.example_id)


def linear(seed: int = 0, d: int = 4, c: int = 3) -> nn.Module:
    """z = W flatten(x) + b: gradients by hand are one line."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, c))


def toy(n: int, seed: int, c: int = 3) -> Split:
    """n images of 1x2x2 pixels in [0.2, 0.8] (clamping to [0, 1] never bites), labels in 0..c-1."""
    g = torch.Generator().manual_seed(seed)
    return Split(0.2 + 0.6 * torch.rand(n, 1, 2, 2, generator=g), torch.randint(0, c, (n,), generator=g),
                 torch.arange(n) + 1000 * seed)


def wb(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    lin = model[1]
    return lin.weight.detach().clone(), lin.bias.detach().clone()


def ce_grad_z(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d mean-CE / d logits."""
    return (z.softmax(1) - F.one_hot(y, z.shape[1]).float()) / z.shape[0]


def grads_wb(gz: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dW, dL/db) of a linear layer from dL/dz."""
    return gz.T @ x.flatten(1), gz.sum(0)


def lin_ctx(model_seed: int = 7) -> UnlearnContext:
    return UnlearnContext(seed=0, recipe=Recipe(1, 0.1, 64), fresh_model=lambda: linear(model_seed))


# ------------------------------------------------------------------ GLI


def distance_grad_z(z: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """d distance_loss / d z by hand."""
    n = z.shape[0]
    diff = z - t
    if kind == "mse":
        return 2 * diff / diff.numel()
    if kind == "l1":
        return diff.sign() / n
    if kind == "l2":
        return diff / diff.norm(dim=1, keepdim=True) / n
    zn, tn = z.norm(dim=1, keepdim=True), t.norm(dim=1, keepdim=True)
    cos = (z * t).sum(1, keepdim=True) / (zn * tn)
    return -(t / (zn * tn) - cos * z / zn ** 2) / n


def hand_perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, w: float, steps: int,
                 step: float, kind: str) -> torch.Tensor:
    """GLI's K sign steps on delta for a linear model, with the gradient written out."""
    weight, bias = wb(model)
    delta = torch.zeros_like(x)
    for _ in range(steps):
        z = (x + delta).flatten(1) @ weight.T + bias
        gz = distance_grad_z(z, target, kind) - w * ce_grad_z(z, y)
        delta = delta + step * (gz @ weight).view_as(x).sign()
    return (x + delta).clamp(0, 1)


@pytest.mark.parametrize("kind", ["mse", "l1", "l2", "cosine"])
def test_gli_perturbation_is_k_sign_steps_on_distance_minus_guided_ce(kind):
    model = linear()
    r, f = toy(6, 1), toy(6, 2)
    with torch.no_grad():
        target = model(f.x)
    got = gli_perturb(model, r.x, r.y, target, 5.0, 3, 0.01, kind, "logits")
    want = hand_perturb(model, r.x, r.y, target, 5.0, 3, 0.01, kind)
    torch.testing.assert_close(got, want)
    assert (got - r.x).abs().max() <= 3 * 0.01 + 1e-7  # the perturbation's implicit bound: K * step
    assert all(q.grad is None for q in model.parameters())  # the search leaves the model's gradients alone


def test_gli_distances_by_definition():
    a, b = torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 4.0], [0.0, 1.0]])
    assert float(distance_loss(a, b, "mse")) == pytest.approx((9 + 16) / 4)
    assert float(distance_loss(a, b, "l1")) == pytest.approx((3 + 4 + 0) / 2)
    assert float(distance_loss(a, b, "l2")) == pytest.approx((5 + 0) / 2, abs=1e-5)
    assert float(distance_loss(a, b, "cosine")) == pytest.approx(-(0 + 1) / 2)  # -cos, maximised


def test_gli_guide_weight_is_linear_over_the_epoch():
    assert [guide_weight(b, 5, 200, 1000) for b in range(5)] == [200, 400, 600, 800, 1000]
    assert guide_weight(0, 1, 200, 1000) == 200


def test_gli_step_is_sgd_on_ce_of_the_perturbed_retain_images():
    model = linear()
    r, f = toy(6, 1), toy(1, 2)  # one forget image: every retain image's partner, whatever the shuffle
    w0, b0 = wb(model)
    with torch.no_grad():
        target = model(f.x).expand(6, -1)
    x_p = hand_perturb(model, r.x, r.y, target, 200.0, 2, 0.01, "mse")
    gw, gb = grads_wb(ce_grad_z(x_p.flatten(1) @ w0.T + b0, r.y), x_p)
    out = run_method("gli", {"lr": 0.1}, model, f, r, lin_ctx())  # one batch: w = w0 = 200
    w1, b1 = wb(out)
    torch.testing.assert_close(w1, w0 - 0.1 * gw)
    torch.testing.assert_close(b1, b0 - 0.1 * gb)


def test_gli_penultimate_features_are_the_head_input(tiny):
    model = fresh(tiny).eval()
    x = tiny[2].x[:5]
    logits, feats = forward_features(model, x, "penultimate")
    with torch.no_grad():
        body = model[1]
        want = body[:-1](model[0](x))  # small_cnn: everything before the final Linear
    torch.testing.assert_close(feats, want)
    torch.testing.assert_close(logits, body[-1](want))


def _modes(model: nn.Module) -> tuple[list[bool], object]:
    """Record, for every gradient-enabled forward pass of `model`, whether it ran in train mode."""
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(
        lambda m, a: seen.append(m.training) if torch.is_grad_enabled() else None)
    return seen, handle


def test_gli_updates_every_retain_batch_in_train_mode_even_with_a_small_forget_set(tiny):
    # Document: pairs of unequal size are skipped (20 forget images < batch 64: no step at all), and its
    # per-batch evaluation leaves the model in eval mode from the second batch on. Ours: every batch steps
    # in train mode; the perturbation search (K passes) and the forget features score in eval mode.
    model = fresh(tiny)
    seen, handle = _modes(model)
    start = copy.deepcopy(model.state_dict())
    out = run_method("gli", {"epochs": 2, "noise_steps": 2, "lr": 0.01}, model, tiny[2], tiny[3], context(tiny))
    handle.remove()
    steps = 2 * batches_per_epoch(len(tiny[3]), 64)
    assert seen == ([False, False, True]) * steps
    assert not same(out.state_dict(), start)


def test_gli_bn_mode_eval_reproduces_the_documents_frozen_statistics(tiny):
    model = fresh(tiny)
    start = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    out = run_method("gli", {"bn_mode": "eval", "lr": 0.01}, model, tiny[2], tiny[3], context(tiny))
    assert all(torch.equal(out.state_dict()[k], v) for k, v in start.items())
    out2 = run_method("gli", {"lr": 0.01}, fresh(tiny), tiny[2], tiny[3], context(tiny))
    assert not all(torch.equal(out2.state_dict()[k], v) for k, v in start.items())


def test_gli_selects_on_validation_only(tiny):
    # Document: the checkpoint with the best NoMUS on the *test* set (and forget MIA) is kept. Ours: the method
    # sees no test set; with select_on val it keeps a real copy of the state best on ctx.val.
    with pytest.raises(ConfigError, match="select_on: val needs validation data"):
        run_method("gli", {"select_on": "val"}, fresh(tiny), tiny[2], tiny[3], context(tiny))
    val = tiny[4]
    ctx = context(tiny, val=val)
    out = run_method("gli", {"select_on": "val", "select_every": 1, "patience": 100, "epochs": 2, "lr": 0.3,
                             "batch_size": 32}, fresh(tiny), tiny[2], tiny[3], ctx)
    scores = ctx.stats["val_scores"]
    assert len(scores) == 2 * batches_per_epoch(len(tiny[3]), 32)
    assert accuracy(out, val) == max(scores)
    assert scores[ctx.stats["selected_step"] - 1] == max(scores)
    ctx = context(tiny, val=val)  # patience: stops after that many checks without improvement
    run_method("gli", {"select_on": "val", "select_every": 1, "patience": 1, "epochs": 3, "lr": 0.3,
                       "batch_size": 32}, fresh(tiny), tiny[2], tiny[3], ctx)
    s = ctx.stats["val_scores"]
    assert s[-1] <= max(s[:-1]) and len(s) < 3 * batches_per_epoch(len(tiny[3]), 32)


# ------------------------------------------------------------------ the benchmark's NegGrad


def test_neggrad_benchmark_takes_one_forget_step_per_retain_batch(tiny):
    # Document: unequal pairs skipped, so 20 forget images with batch 64 give no step. Ours: one step on the
    # next cycled forget batch per retain batch; the retain batches themselves never reach the model.
    model = fresh(tiny)
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(lambda m, a: seen.append(bool((a[0][:, 0, 0, 0] == SENTINEL).all())))
    run_method("neggrad_benchmark", {"epochs": 3}, model, marked(tiny[2]), tiny[3], context(tiny))
    handle.remove()
    assert len(seen) == 3 * batches_per_epoch(len(tiny[3]), 64) and all(seen)
    assert METHODS["neggrad"].params().steps_per_epoch == "forget"  # SPEC's GA is unchanged by default


def test_neggrad_benchmark_is_repeated_ascent_on_the_forget_set():
    model = linear()
    f, r = toy(5, 2), toy(40, 1)  # D_f is one batch; D_r has 3 batches of 16
    w, b = wb(model)
    for _ in range(2 * 3):
        gw, gb = grads_wb(ce_grad_z(f.x.flatten(1) @ w.T + b, f.y), f.x)
        w, b = w + 0.1 * gw, b + 0.1 * gb  # descent on -CE
    out = run_method("neggrad_benchmark", {"lr": 0.1, "batch_size": 16}, model, f, r, lin_ctx())
    w1, b1 = wb(out)
    torch.testing.assert_close(w1, w)
    torch.testing.assert_close(b1, b)


# ------------------------------------------------------------------ Advanced NegGrad


def test_advanced_neggrad_step_by_hand():
    model = linear()
    f, r = toy(5, 2), toy(8, 1)
    w0, b0 = wb(model)
    gwr, gbr = grads_wb(ce_grad_z(r.x.flatten(1) @ w0.T + b0, r.y), r.x)
    gwf, gbf = grads_wb(ce_grad_z(f.x.flatten(1) @ w0.T + b0, f.y), f.x)
    out = run_method("advanced_neggrad", {"lam": 0.3, "optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0},
                     model, f, r, lin_ctx())
    w1, b1 = wb(out)
    torch.testing.assert_close(w1, w0 - 0.1 * (gwr - 0.3 * gwf))
    torch.testing.assert_close(b1, b0 - 0.1 * (gbr - 0.3 * gbf))


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_advanced_neggrad_is_neggrad_plus_reparametrised(tiny, lam):
    # alpha = 1 / (1 + lam), lr * (1 + lam), weight_decay / (1 + lam): the same weights (SGD with momentum)
    common = {"epochs": 2, "batch_size": 32, "momentum": 0.9}
    a = run_method("advanced_neggrad", {**common, "lam": lam, "optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4},
                   fresh(tiny), tiny[2], tiny[3], context(tiny, seed=4))
    b = run_method("neggrad_plus", {**common, "alpha": 1 / (1 + lam), "lr": 0.01 * (1 + lam),
                                    "weight_decay": 5e-4 / (1 + lam)}, fresh(tiny), tiny[2], tiny[3],
                   context(tiny, seed=4))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not same(a.state_dict(), tiny[0])


# ------------------------------------------------------------------ SCRUB's options and presets


def test_distill_kl_by_hand_and_identical_outputs_give_zero():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    p, q = (t / 2).softmax(1), (s / 2).softmax(1)
    want = (p * (p.log() - q.log())).sum(1).mean() * 4
    torch.testing.assert_close(distill_kl(s, t, 2.0), want)
    # seed 004 fed probabilities to KLDivLoss, which is not zero for identical outputs; the true KL is
    assert float(distill_kl(s, s, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert abs(float(F.kl_div(s.softmax(1), s.softmax(1), reduction="batchmean"))) > 0.1


def test_scrub_benchmark_runs_retain_then_forget_every_epoch(tiny):
    # MUFAC benchmark order: the min phase on D_r first, then the max phase on D_f, in every epoch (no msteps)
    model = fresh(tiny)
    seen: list[str] = []
    handle = model.register_forward_pre_hook(
        lambda m, a: seen.append("f" if bool((a[0][:, 0, 0, 0] == SENTINEL).all()) else "r")
        if m.training else None)
    ctx = context(tiny)
    run_method("scrub_benchmark", {"epochs": 3}, model, marked(tiny[2]), tiny[3], ctx)
    handle.remove()
    per_epoch = ["r"] * batches_per_epoch(len(tiny[3]), 64) + ["f"]
    assert seen == per_epoch * 3 and ctx.stats["max_phases"] == 3


def test_scrub_retain_first_epoch_by_hand():
    model = linear()
    teacher = copy.deepcopy(model)
    f, r = toy(5, 2), toy(8, 1)
    t, lr, gamma = 4.0, 0.1, 0.7
    w0, b0 = wb(model)
    # min phase: gamma * CE + alpha * KL_T; the KL's gradient is zero where student = teacher (the start)
    gw, gb = grads_wb(gamma * ce_grad_z(r.x.flatten(1) @ w0.T + b0, r.y), r.x)
    w1, b1 = w0 - lr * gw, b0 - lr * gb
    # max phase: -T^2 KL(teacher_T || student_T); d/dz of T^2 KL = T (softmax(z/T) - p_teacher) / n
    with torch.no_grad():
        pt = (teacher(f.x) / t).softmax(1)
    z = f.x.flatten(1) @ w1.T + b1
    gw, gb = grads_wb(-t * ((z / t).softmax(1) - pt) / len(f), f.x)
    w2, b2 = w1 - lr * gw, b1 - lr * gb
    out = run_method("scrub_benchmark", {"epochs": 1, "lr": lr, "gamma": gamma, "alpha": 0.5}, model, f, r,
                     lin_ctx())
    got = wb(out)
    torch.testing.assert_close(got[0], w2)
    torch.testing.assert_close(got[1], b2)


def test_scrub_defaults_unchanged():
    p = METHODS["scrub"].params()
    assert (p.order, p.msteps, p.gamma, p.alpha, p.temperature, p.lr, p.epochs, p.optimizer) == \
        ("forget_first", 2, 0.99, 0.001, 4.0, 5e-4, 3, "sgd")
    q = METHODS["scrub_004"].params()
    assert (q.gamma, q.alpha, q.temperature, q.msteps, q.optimizer) == (3.0, 0.1, 1.0, None, "adamw")


# ------------------------------------------------------------------ UNSIR


def test_class_noise_first_adam_step_by_hand():
    model = linear().eval()
    start = toy(6, 3).x
    weight, bias = wb(model)
    z = start.flatten(1) @ weight.T + bias
    g = (-ce_grad_z(z, torch.full((6,), 2)) @ weight).view_as(start) + 0.1 * 2 * start / 6
    want = start - 0.05 * g / (g.abs() + 1e-8)  # Adam's first step: lr * m_hat / (sqrt(v_hat) + eps)
    got = class_noise(model, 2, start, steps=1, lr=0.05, reg=0.1)
    torch.testing.assert_close(got, want)


def test_unsir_noise_is_labelled_with_its_class_and_raises_that_class_loss(tiny):
    # Document's code: `class_num = 0` is never updated, so every noise batch is labelled class 0.
    model = fresh(tiny)
    ctx = context(tiny)
    noise_params = {"noise_batch": 16, "noise_epochs": 5, "noise_steps": 8, "noise_reg": 0.0}
    prepared = prepare_method("unsir", noise_params, model, tiny[2], tiny[3], ctx)
    labels = prepared["noise_labels"]
    assert torch.equal(labels, torch.unique(tiny[2].y))
    model.eval()
    with torch.no_grad():  # ce[k, c]: mean CE of class k's noise under label c
        ce = torch.stack([-model(noise).log_softmax(1).mean(0) for noise in prepared["noise"]])[:, labels]
    # every class is hurt more by its own noise than by the others' on average (were all noise labelled 0, as
    # in the document's code, only class 0 would be)
    assert bool((ce.diagonal() > ce.mean(0)).all())
    start = torch.randn((8, *tiny[2].x.shape[1:]), generator=torch.Generator().manual_seed(9))
    y = torch.full((8,), 3)
    with torch.no_grad():
        before = F.cross_entropy(model(start), y)
        after = F.cross_entropy(model(class_noise(model, 3, start, steps=10, lr=0.1, reg=0.0)), y)
    assert after > before
    again = prepare_method("unsir", noise_params, model, tiny[2], tiny[3], ctx)
    assert torch.equal(again["noise"], prepared["noise"])  # seeded: the caller may cache it
    other = prepare_method("unsir", noise_params, model, tiny[2], tiny[3], context(tiny, seed=1))
    assert not torch.equal(other["noise"], prepared["noise"])  # and its key must cover the seed
    assert METHODS["unsir"].prepare.uses_seed


def test_unsir_keeps_every_noise_image(tiny):
    # Document's code iterates over a batch's channels, keeping 3 noise images per copy; ours keeps all B.
    ctx = context(tiny)
    run_method("unsir", {"noise_batch": 8, "noise_epochs": 1, "noise_steps": 2, "impair_noise_epochs": 3,
                         "max_retain_per_class": 5, "batch_size": 64}, fresh(tiny), tiny[2], tiny[3], ctx)
    classes = len(torch.unique(tiny[2].y))
    assert ctx.prepared["noise"].shape[:2] == (classes, 8)
    subset = int(torch.bincount(tiny[3].y).clamp(max=5).sum())
    assert ctx.stats["impair_examples"] == classes * 8 * 3 + subset


def test_unsir_uses_the_callers_prepared_noise(tiny):
    params = {"noise_batch": 8, "noise_epochs": 1, "noise_steps": 2, "impair_noise_epochs": 2, "batch_size": 64}
    ctx = context(tiny)
    a = run_method("unsir", params, fresh(tiny), tiny[2], tiny[3], ctx)
    cached = {k: v.clone() for k, v in ctx.prepared.items()}
    ctx2 = context(tiny)
    ctx2.prepared = cached
    b = run_method("unsir", params, fresh(tiny), tiny[2], tiny[3], ctx2)
    assert same(a.state_dict(), b.state_dict()) and "prepare_seconds" not in ctx2.stats
    c = run_method("unsir", {**params, "stop_after": "impair"}, fresh(tiny), tiny[2], tiny[3], context(tiny))
    assert not same(a.state_dict(), c.state_dict())


def test_per_class_subset_caps_each_class():
    y = torch.tensor([0] * 7 + [1] * 2 + [2] * 5)
    pos = per_class_subset(y, 3, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(y[pos], minlength=3), torch.tensor([3, 2, 3]))
    assert len(set(pos.tolist())) == len(pos)
    assert torch.equal(pos, per_class_subset(y, 3, torch.Generator().manual_seed(0)))


def test_instance_noise_first_adam_step_by_hand():
    model = linear().eval()
    start, zf = toy(6, 3).x, torch.randn(6, 3)
    weight, bias = wb(model)
    z = start.flatten(1) @ weight.T + bias
    g = (-2 * (z - zf) / z.numel() @ weight).view_as(start)  # d(-MSE)/dN
    want = (start - 0.05 * g / (g.abs() + 1e-8)).clamp(0, 1)
    torch.testing.assert_close(instance_noise(model, zf, start, steps=1, lr=0.05), want)


def test_unsir_instance_steps_every_retain_batch_in_train_mode(tiny):
    # Document: unequal pairs skipped (20 forget < 64: nothing happens). Ours: each retain batch gets forget
    # partners; noise search in eval mode, then the step (two train-mode passes), then the repair pass.
    model = fresh(tiny)
    seen, handle = _modes(model)
    out = run_method("unsir_instance", {"noise_steps": 2, "max_retain_per_class": 8}, model, tiny[2], tiny[3],
                     context(tiny))
    handle.remove()
    pool = int(torch.bincount(tiny[3].y).clamp(max=8).sum())
    steps = batches_per_epoch(pool, 64)
    assert seen == [False, False, True, True] * steps + [True] * steps
    assert not same(out.state_dict(), tiny[0])


def test_forget_stream_pairs_every_example_and_cycles():
    s = ForgetStream(3, torch.Generator().manual_seed(0), torch.device("cpu"))
    got = torch.cat([s.take(2), s.take(4), s.take(3)])
    assert len(got) == 9 and all(sorted(got[i:i + 3].tolist()) == [0, 1, 2] for i in (0, 3, 6))


# ------------------------------------------------------------------ Bad Teaching


def test_bad_teacher_loss_by_hand():
    s, good, bad = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    is_forget = torch.tensor([True, False, True, False])
    t = 2.0
    target = torch.where(is_forget[:, None], (bad / t).softmax(1), (good / t).softmax(1))
    q = (s / t).softmax(1)
    want = (target * (target.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(bad_teacher_loss(s, good, bad, is_forget, t), want)
    # the reference's reduction='mean' also divides by the number of classes
    torch.testing.assert_close(bad_teacher_loss(s, good, bad, is_forget, t, "mean"), want / 5)
    torch.testing.assert_close(kl_to_probs(s, q, t), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_bad_teaching_step_by_hand():
    model = linear()
    f, r = toy(3, 2), toy(5, 1)
    ctx = lin_ctx(model_seed=7)
    bad = linear(7)
    w0, b0 = wb(model)
    x = torch.cat([f.x, r.x])
    with torch.no_grad():
        target = torch.cat([bad(f.x).softmax(1), model(r.x).softmax(1)])
    gw, gb = grads_wb((x.flatten(1) @ w0.T + b0).softmax(1).sub(target) / len(x), x)
    out = run_method("bad_teaching", {"optimizer": "sgd", "momentum": 0.0, "lr": 0.5, "retain_fraction": 1.0},
                     model, f, r, ctx)
    w1, b1 = wb(out)
    torch.testing.assert_close(w1, w0 - 0.5 * gw)
    torch.testing.assert_close(b1, b0 - 0.5 * gb)


def test_bad_teaching_teachers_are_the_start_and_a_seeded_fresh_init(tiny):
    ctx = context(tiny, seed=3)
    state = random_teacher_state(ctx)
    assert same({k.split(".", 1)[1]: v for k, v in state.items()}, create_model(tiny[1], seed=3).state_dict())
    teacher = load_teacher(ctx, state, torch.device("cpu"))
    assert not teacher.training and not any(q.requires_grad for q in teacher.parameters())
    assert METHODS["bad_teaching"].prepare.uses_seed
    # the competent teacher is a frozen copy of the model as given (the step's start), never updated
    model = fresh(tiny)
    start = copy.deepcopy(model.state_dict())
    drift = []
    model.register_forward_pre_hook(lambda m, a: drift.append(max(
        float((v.float() - start[k].float()).abs().max()) for k, v in m.state_dict().items()))
        if not m.training else None)  # a deepcopy carries the hook to the competent teacher
    run_method("bad_teaching", {"lr": 1e-3}, model, tiny[2], tiny[3], ctx)
    assert drift and max(drift) == 0.0


def test_bad_teaching_retain_subset_sizes(tiny):
    f, r = tiny[2], tiny[3]
    ctx = context(tiny)
    run_method("bad_teaching", {}, fresh(tiny), f, r, ctx)
    assert ctx.stats["retain_subset"] == round(0.3 * len(r))
    ctx = context(tiny)
    run_method("bad_teaching_retain_subset", {"epochs": 1}, fresh(tiny), f, r, ctx)
    assert ctx.stats["retain_subset"] == 3 * len(f)
    p = METHODS["bad_teaching_retain_subset"].params()
    assert (p.retain_scale, p.epochs, p.weight_decay, p.optimizer, p.lr) == (3.0, 5, 5e-3, "adam", 1e-4)
