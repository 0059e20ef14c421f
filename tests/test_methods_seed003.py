"""Seed 003's methods (SSD, naive Fisher pruning, GISA, contrastive unlearning, Fisher forgetting, Bad Teaching
with similarity sampling): each defining step against a hand computation on a tiny model, and each bug of the
document we fix pinned."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rumflow.data import Split, load_dataset
from rumflow.methods import METHODS, UnlearnContext, run_method, validate_params
from rumflow.methods.contrastive import contrastive_uniform_loss, uniform_kl
from rumflow.methods.fisher import fisher_diagonal, head_and_norm_names, noise_variance
from rumflow.methods.gisa import gisa_loss, lr_multipliers
from rumflow.methods.registry import prepare_method
from rumflow.methods.similarity_teachers import (BAD_TEACHER, alternation, penultimate_features,
                                                 similarity_subset, weighted_kl)
from rumflow.methods.ssd import importances, union
from rumflow.models import ModelSpec, create_model
from rumflow.training import Recipe, train_model


# ------------------------------------------------------------------ fixtures


def linear_model(w: torch.Tensor | None = None, b: torch.Tensor | None = None) -> nn.Module:
    """A softmax-regression model (4 features, 3 classes): its gradients have a closed form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        if w is not None:
            model[0].weight.copy_(w)
        if b is not None:
            model[0].bias.copy_(b)
    return model


def blob_split(n: int, seed: int, offset: int = 0) -> Split:
    """n random 4-feature examples with labels 0..2 and ids offset..offset+n-1."""
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g),
                 torch.arange(offset, offset + n))


def context(seed: int = 0, prepared: dict | None = None, fresh=lambda: linear_model()) -> UnlearnContext:
    return UnlearnContext(seed=seed, recipe=Recipe(1, 0.1, 64), fresh_model=fresh, prepared=prepared)


def closed_form_grad(model: nn.Module, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """d mean-CE / d (W, b) of softmax regression: (P - Y)^T X / B and mean(P - Y)."""
    with torch.no_grad():
        p = F.softmax(model(split.x), dim=1)
    d = p - F.one_hot(split.y, 3).float()
    return d.T @ split.x / len(split), d.mean(0)


@pytest.fixture(scope="module")
def digits():
    """200 digits examples (20 to forget) and a small CNN briefly trained on them."""
    ds = load_dataset("digits")
    data = ds.train.take(ds.train.ids()[:200])
    fid = data.ids()[::10]
    spec = ModelSpec("small_cnn", ds.num_classes, ds.in_channels, ds.mean, ds.std)
    model = create_model(spec, seed=0)
    train_model(model, data, Recipe(epochs=10, lr=0.1, batch_size=32), seed=0)
    return model.state_dict(), spec, data.take(fid), data.drop(fid)


def digits_model(setup) -> nn.Module:
    model = create_model(setup[1])
    model.load_state_dict(setup[0])
    return model


def digits_context(setup, seed: int = 0, prepared: dict | None = None) -> UnlearnContext:
    spec = setup[1]
    return UnlearnContext(seed=seed, recipe=Recipe(2, 0.05, 64), fresh_model=lambda: create_model(spec, seed=seed),
                          prepared=prepared)


# ------------------------------------------------------------------ importances (SSD's diagonal Fisher)


def test_importances_are_squared_batch_mean_gradients_averaged_over_batches():
    model = linear_model()
    data = blob_split(10, seed=1)
    # one batch: the square of the closed-form mean gradient
    imp = importances(model, data, batch_size=64)
    gw, gb = closed_form_grad(model, data)
    torch.testing.assert_close(imp["0.weight"], gw.square())
    torch.testing.assert_close(imp["0.bias"], gb.square())
    # batches of 4 (4, 4, 2) in the documented fixed seed-0 order: the mean of the three squares
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    parts = [order[0:4], order[4:8], order[8:10]]
    expected = sum(closed_form_grad(model, Split(data.x[i], data.y[i], data.example_id[i]))[0].square()
                   for i in parts) / 3
    imp4 = importances(model, data, batch_size=4)
    torch.testing.assert_close(imp4["0.weight"], expected)
    # not the per-example Fisher (the mean of per-example squared gradients)
    per_example = sum(closed_form_grad(model, Split(data.x[i:i + 1], data.y[i:i + 1], data.example_id[i:i + 1]))[0]
                      .square() for i in range(10)) / 10
    assert not torch.allclose(imp4["0.weight"], per_example)


def test_importances_use_eval_mode_and_leave_the_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    data = blob_split(12, seed=2)
    with torch.no_grad():  # give BatchNorm running statistics that differ from the batch statistics
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
    before = copy.deepcopy(model.state_dict())
    imp = importances(model, data, batch_size=64)
    assert model.training and all(q.grad is None for q in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ref = copy.deepcopy(model).eval()  # eval mode: running statistics, no dropout
    F.cross_entropy(ref(data.x), data.y).backward()
    for n, q in ref.named_parameters():
        torch.testing.assert_close(imp[n], q.grad.square())


# ------------------------------------------------------------------ SSD


def ssd_prepared(forget_w, ref_w, forget_b, ref_b) -> dict[str, torch.Tensor]:
    t = lambda v: torch.tensor(v, dtype=torch.float32)
    return {"forget.0.weight": t(forget_w), "reference.0.weight": t(ref_w),
            "forget.0.bias": t(forget_b), "reference.0.bias": t(ref_b)}


def test_ssd_dampens_selected_weights_by_hand():
    w = torch.tensor([[100.0, 0.01, 2.0, -3.0], [1.0, 1.0, 1.0, 1.0], [5.0, -5.0, 0.5, 7.0]])
    b = torch.tensor([1.0, -2.0, 3.0])
    # alpha 2, lambda 1: selected where I_f > 2 I_ref
    i_f = [[4.0, 4.0, 1.0, 30.0], [5.0, 0.0, 2.0, 2.1], [8.0, 8.0, 8.0, 8.0]]
    i_r = [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]]
    prepared = ssd_prepared(i_f, i_r, [3.0, 1.0, 9.0], [1.0, 1.0, 0.1])
    forget = blob_split(4, seed=3)
    ctx = context(prepared=prepared)
    out = run_method("ssd", {"selection_weighting": 2.0, "dampening_constant": 1.0}, linear_model(w, b), forget,
                     blob_split(8, seed=4, offset=10), ctx)
    expected_w = torch.tensor([
        [100.0 * 1 / 4, 0.01 * 1 / 4, 2.0, -3.0 / 30],  # the same factor 1/4 for 100 and 0.01: theta is not in the min
        [0.0, 1.0, 1.0, 1.0 / 2.1],  # I_ref = 0 zeroes; I_f = I_ref = 0 is not selected; 2 > 2 is not
        [5.0 / 8, -5.0 * 2 / 8, 0.5 * 3 / 8, 7.0],      # 8 > 8 is not selected
    ])
    expected_b = torch.tensor([1.0 / 3, -2.0, 3.0 * 0.1 / 9])
    torch.testing.assert_close(out[0].weight.detach(), expected_w)
    torch.testing.assert_close(out[0].bias.detach(), expected_b)
    assert ctx.stats["selected_fraction"] == pytest.approx(10 / 15)


def test_ssd_factor_is_capped_and_raised_to_the_exponent():
    w, b = torch.ones(3, 4), torch.ones(3)
    i_f = [[4.0] * 4] * 3
    i_r = [[1.0] * 4] * 3
    prepared = ssd_prepared(i_f, i_r, [4.0] * 3, [1.0] * 3)
    # lambda 8: 8 * 1/4 = 2 is capped at lower_bound 1 (never scaled up) ...
    out = run_method("ssd", {"selection_weighting": 2.0, "dampening_constant": 8.0}, linear_model(w, b),
                     blob_split(4, 3), blob_split(4, 4, 10), context(prepared=dict(prepared)))
    assert torch.equal(out[0].weight.detach(), w)
    # ... or at a lower cap; exponent 2 squares the factor: (1 * 1/4)^2
    out = run_method("ssd", {"selection_weighting": 2.0, "lower_bound": 0.5}, linear_model(w, b),
                     blob_split(4, 3), blob_split(4, 4, 10), context(prepared=dict(prepared)))
    torch.testing.assert_close(out[0].weight.detach(), torch.full((3, 4), 0.25))
    out = run_method("ssd", {"selection_weighting": 2.0, "exponent": 2.0}, linear_model(w, b),
                     blob_split(4, 3), blob_split(4, 4, 10), context(prepared=dict(prepared)))
    torch.testing.assert_close(out[0].weight.detach(), torch.full((3, 4), 1 / 16))


def test_ssd_and_ssd_retain_prepare_the_documented_importances(digits):
    _, _, forget, retain = digits
    model = digits_model(digits)
    full = prepare_method("ssd", {}, model, forget, retain, digits_context(digits))
    ret = prepare_method("ssd_retain", {}, model, forget, retain, digits_context(digits))
    want_f = importances(model, forget, 128)
    want_full = importances(model, union(retain, forget), 128)
    want_retain = importances(model, retain, 128)
    for n in want_f:
        torch.testing.assert_close(full["forget." + n], want_f[n])
        torch.testing.assert_close(ret["forget." + n], want_f[n])
        torch.testing.assert_close(full["reference." + n], want_full[n])
        torch.testing.assert_close(ret["reference." + n], want_retain[n])
    assert not torch.equal(full["reference.1.12.weight"], ret["reference.1.12.weight"])
    # the original's lambda 1 is the default; seed 003's run (I_ref over D_r, lambda 0.1) is the preset
    a, b = validate_params("ssd", {}), validate_params("ssd_retain", {})
    assert (a.reference, a.dampening_constant, a.selection_weighting) == ("full", 1.0, 10.0)
    assert (b.reference, b.dampening_constant, b.selection_weighting) == ("retain", 0.1, 10.0)
    assert METHODS["ssd_retain"].preset_of == "ssd"


@pytest.mark.parametrize("lam", [1.0, 0.1])
def test_ssd_selected_weights_shrink_below_lambda_over_alpha(digits, lam):
    """Why seed 003's SSD collapsed: a selected weight has I_ref / I_f < 1 / alpha, so it is multiplied by less
    than lambda / alpha (0.1 for the original's lambda 1, 0.01 for 003's 0.1): dampening is near-pruning."""
    _, _, forget, retain = digits
    model = digits_model(digits)
    start = {n: q.detach().clone() for n, q in model.named_parameters()}
    ctx = digits_context(digits)
    out = run_method("ssd_retain", {"dampening_constant": lam}, model, forget, retain, ctx)
    assert ctx.stats["selected_fraction"] > 0
    for n, q in out.named_parameters():
        changed = (q.detach() != start[n])
        ratio = q.detach()[changed] / start[n][changed]
        assert (ratio.abs() < lam / 10 + 1e-6).all(), n


# ------------------------------------------------------------------ naive Fisher pruning


def test_fisher_prune_naive_zeroes_every_weight_with_positive_forget_importance():
    w = torch.arange(1.0, 13.0).view(3, 4)
    b = torch.tensor([1.0, 2.0, 3.0])
    i_f = torch.tensor([[0.0, 1e-12, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    prepared = {"forget.0.weight": i_f, "forget.0.bias": torch.tensor([0.0, 5.0, 0.0])}
    ctx = context(prepared=prepared)
    out = run_method("fisher_prune_naive", {}, linear_model(w, b), blob_split(4, 3), blob_split(4, 4, 10), ctx)
    torch.testing.assert_close(out[0].weight.detach(), torch.where(i_f > 0, 0.0, w))
    torch.testing.assert_close(out[0].bias.detach(), torch.tensor([1.0, 0.0, 3.0]))
    assert ctx.stats["pruned_fraction"] == pytest.approx(7 / 15)


def test_fisher_prune_naive_is_degenerate_on_a_real_model(digits):
    """003's strawman: almost every importance is positive, so almost every weight is pruned."""
    _, _, forget, retain = digits
    ctx = digits_context(digits)
    run_method("fisher_prune_naive", {}, digits_model(digits), forget, retain, ctx)
    assert ctx.stats["pruned_fraction"] > 0.99


# ------------------------------------------------------------------ GISA


def test_gisa_lr_multipliers_by_hand():
    e = math.e
    f = {"a": torch.tensor([e ** 2, 1.0]), "b": torch.tensor([1.0, 1.0]), "c": torch.tensor([0.0, e ** 4])}
    r = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([e, e]), "c": torch.tensor([1.0, 1.0])}
    # a: logs (2, 0) -> mean 1; b: logs (-1, -1) clamp to 0; c: log 0 = -inf clamps to 0, log e^4 = 4 -> mean 2
    formula = lr_multipliers(f, r, eps=1e-12, scaling="formula")
    text = lr_multipliers(f, r, eps=1e-12, scaling="text")
    assert formula == pytest.approx({"a": 2.0, "b": 1.0, "c": 3.0})
    assert text == pytest.approx({"a": 0.5, "b": 1.0, "c": 1 / 3})  # the prose's "dampened" reading
    # eps guards a zero retain importance: log(1 / 1e-8)
    only_f = lr_multipliers({"a": torch.tensor([1.0])}, {"a": torch.tensor([0.0])}, eps=1e-8, scaling="formula")
    assert only_f["a"] == pytest.approx(1 + math.log(1e8))


def test_gisa_loss_descends_on_retain_and_ascends_on_forget():
    r = torch.tensor(0.5, requires_grad=True)
    f = torch.tensor(2.0, requires_grad=True)
    j = gisa_loss(r, f, eps=1e-6)
    j.backward()
    assert float(j.detach()) == pytest.approx(0.25 / (2 + 1e-6))
    assert float(r.grad) == pytest.approx(2 * 0.5 / (2 + 1e-6))   # > 0: lower CE_r
    assert float(f.grad) == pytest.approx(-0.25 / (2 + 1e-6) ** 2)  # < 0: raise CE_f


@pytest.mark.parametrize("scaling", ["formula", "text"])
def test_gisa_step_is_minus_per_tensor_lr_times_the_ratio_loss_gradient(scaling):
    w = torch.tensor([[0.5, -0.2, 0.1, 0.3], [0.0, 0.4, -0.3, 0.2], [-0.1, 0.1, 0.2, -0.4]])
    b = torch.tensor([0.1, -0.1, 0.0])
    forget, retain = blob_split(6, seed=5), blob_split(10, seed=6, offset=10)
    # weight: logs (12, 0, .., 0) with mean 1 -> x2 (or /2); bias: ratio below 1 -> x1
    i_f_w = torch.ones(3, 4)
    i_f_w[0, 0] = math.e ** 12
    prepared = {"forget.0.weight": i_f_w, "retain.0.weight": torch.ones(3, 4),
                "forget.0.bias": torch.ones(3), "retain.0.bias": torch.full((3,), 2.0)}
    lr = 0.1
    params = {"lr": lr, "epochs": 1, "batch_size": 64, "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0,
              "scaling": scaling, "ratio_eps": 1e-12}
    ctx = context(prepared=prepared)
    out = run_method("gisa", params, linear_model(w, b), forget, retain, ctx)
    # by hand: one step on J = CE_r^2 / (CE_f + 1e-6) over the whole retain and forget sets
    ref = linear_model(w, b)
    loss = gisa_loss(F.cross_entropy(ref(retain.x), retain.y), F.cross_entropy(ref(forget.x), forget.y), 1e-6)
    gw, gb = torch.autograd.grad(loss, [ref[0].weight, ref[0].bias])
    mult_w = 2.0 if scaling == "formula" else 0.5
    torch.testing.assert_close(out[0].weight.detach(), w - lr * mult_w * gw)
    torch.testing.assert_close(out[0].bias.detach(), b - lr * 1.0 * gb)
    assert ctx.stats["lr_multipliers"] == pytest.approx({"0.weight": mult_w, "0.bias": 1.0})


# ------------------------------------------------------------------ contrastive unlearning


def test_uniform_kl_by_hand():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    p = F.softmax(z, dim=1)
    by_hand = sum(sum((1 / 3) * (math.log(1 / 3) - math.log(float(p[i, c]))) for c in range(3)) for i in range(2)) / 2
    assert float(uniform_kl(z)) == pytest.approx(by_hand)
    assert float(uniform_kl(torch.zeros(4, 3))) == pytest.approx(0.0, abs=1e-7)


def test_contrastive_loss_by_hand_and_retain_logits_detached():
    zf = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]], requires_grad=True)
    zr = torch.tensor([[0.5, 0.5, 0.0], [1.0, -1.0, 1.0], [0.0, 2.0, 0.0]], requires_grad=True)
    tau = 1.15
    total = 0.0
    for i in range(2):
        sims = [sum(float(zf[i, c].detach()) * float(zr[t, c].detach()) for c in range(3)) / tau for t in range(3)]
        lse = math.log(sum(math.exp(s) for s in sims))
        total += sum(-(s - lse) for s in sims)
    loss = contrastive_uniform_loss(zf, zr, tau)
    assert float(loss.detach()) == pytest.approx(total / 6)
    loss.backward()
    assert zr.grad is None and zf.grad is not None  # only the forget logits are pushed


def test_contrastive_uniform_stage_flattens_forget_predictions(digits):
    _, _, forget, retain = digits
    model = digits_model(digits)
    with torch.no_grad():
        before = model.eval()(forget.x)
    ctx = digits_context(digits)
    out = run_method("contrastive_unlearn", {"epochs": 0, "uniform_epochs": 3, "uniform_lr": 0.01, "batch_size": 8},
                     model, forget, retain, ctx)
    with torch.no_grad():
        after = out.eval()(forget.x)
    assert float(uniform_kl(after)) < 0.6 * float(uniform_kl(before))
    assert F.softmax(after, 1).max(1).values.mean() < F.softmax(before, 1).max(1).values.mean() - 0.05
    assert len(ctx.stats["uniform_loss"]) == 3 and ctx.stats["contrastive_loss"] == [] and ctx.stats["loss"] == []
    ctx = digits_context(digits)
    run_method("contrastive_unlearn", {"epochs": 2, "batch_size": 8}, digits_model(digits), forget, retain, ctx)
    assert [len(ctx.stats[k]) for k in ("uniform_loss", "contrastive_loss", "loss")] == [1, 2, 2]
    # the contrastive loss is a cross-entropy against a uniform target over the retain batch: at least log(8)
    assert min(ctx.stats["contrastive_loss"]) >= math.log(8) - 1e-4


# ------------------------------------------------------------------ Fisher forgetting


def test_fisher_diagonal_is_the_true_fisher_of_softmax_regression():
    model = linear_model().train()
    data = blob_split(7, seed=7)
    fisher = fisher_diagonal(model, data, batch_size=3)  # several batches, a short last one
    assert model.training
    with torch.no_grad():
        p = F.softmax(model(data.x), dim=1)  # [B, C]
    eye = torch.eye(3)
    d = p[:, None, :] - eye[None]  # [B, y, k]: d CE(x, y) / d logit_k
    gw = d[..., None] * data.x[:, None, None, :]  # [B, y, k, j]
    want_w = (p[:, :, None, None] * gw.square()).sum(1).mean(0)
    want_b = (p[:, :, None] * d.square()).sum(1).mean(0)
    torch.testing.assert_close(fisher["0.weight"], want_w)
    torch.testing.assert_close(fisher["0.bias"], want_b)


def test_fisher_noise_variance_by_hand():
    fisher = torch.tensor([[0.0, 1.0], [3.0, 1e9]])
    var = noise_variance(fisher, alpha=1e-6, cap=1e3, scale=10.0)
    row0 = (1e3 + 1 / (1 + 1e-8)) / 2 * 1e-6 * 10  # 1 / 1e-8 is clamped at the cap
    row1 = (1 / (3 + 1e-8) + 1 / (1e9 + 1e-8)) / 2 * 1e-6 * 10
    torch.testing.assert_close(var, torch.tensor([[row0, row0], [row1, row1]]))
    torch.testing.assert_close(noise_variance(torch.tensor([0.0, 4.0]), 1e-6, 1e2, 1.0),
                               torch.tensor([1e-4, 1e-6 / (4 + 1e-8)]))  # 1-D: no averaging


def test_fisher_head_and_norm_by_module_type_not_shape():
    """The reference picks the head by `p.size(0) == num_classes` and BatchNorm by `p.ndim == 1`, which also
    catches a hidden layer with C outputs and every bias; we go by module type."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 3))
    head, norm = head_and_norm_names(model)
    assert head == {"3.weight", "3.bias"} and norm == {"1.weight", "1.bias"}


def test_fisher_forgetting_adds_seeded_inverse_fisher_noise(digits):
    _, _, forget, retain = digits
    model = digits_model(digits)
    start = {n: q.detach().clone() for n, q in model.named_parameters()}
    prepared = {"fisher." + n: torch.ones_like(q) for n, q in model.named_parameters()}
    alpha = 1e-4
    out = run_method("fisher_forgetting", {"alpha": alpha}, model, forget, retain,
                     digits_context(digits, seed=5, prepared=prepared))
    gen = torch.Generator().manual_seed(5)
    head, norm = head_and_norm_names(out)
    assert head == {"1.12.weight", "1.12.bias"} and len(norm) == 6
    for n, q in out.named_parameters():
        z = torch.randn(q.shape, generator=gen)
        std = math.sqrt(alpha / (1 + 1e-8) * (10.0 if n in head | norm else 1.0))
        torch.testing.assert_close(q.detach() - start[n], std * z, rtol=1e-4, atol=1e-7)
    other = run_method("fisher_forgetting", {"alpha": alpha}, digits_model(digits), forget, retain,
                       digits_context(digits, seed=6, prepared=prepared))
    assert not torch.equal(other[1][0].weight, out[1][0].weight)


# ------------------------------------------------------------------ Bad Teaching with similarity sampling


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_similarity_subset_by_hand():
    forget = torch.tensor([unit(0), unit(90)])
    retain = torch.tensor([unit(5), unit(10), unit(45), unit(84), unit(200)])
    # k = 3: forget 0 -> 5, 10, 45; forget 90 -> 84, 45, 10; 200 degrees is nobody's neighbour
    pos, votes = similarity_subset(forget, retain, k=3, budget=10)
    assert pos.tolist() == [0, 1, 2, 3] and votes.tolist() == [1, 2, 2, 1]
    # a budget of 3 keeps the two double votes, then the single vote with the higher similarity (5 degrees)
    pos, votes = similarity_subset(forget, retain, k=3, budget=3)
    assert pos.tolist() == [0, 1, 2] and votes.tolist() == [1, 2, 2]
    # chunking the similarity matrix changes nothing; k larger than D_r takes all of it
    assert similarity_subset(forget, retain, k=3, budget=10, chunk=1)[1].tolist() == [1, 2, 2, 1]
    assert similarity_subset(forget, retain, k=9, budget=10)[0].tolist() == [0, 1, 2, 3, 4]


def test_weighted_kl_by_hand():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    ps, pt = F.softmax(s, 1), F.softmax(t, 1)
    kl = [sum(float(pt[i, c]) * (math.log(float(pt[i, c])) - math.log(float(ps[i, c]))) for c in range(2))
          for i in range(2)]
    assert float(weighted_kl(s, t, torch.tensor([2.0, 0.0]), 1.0)) == pytest.approx(2 * kl[0] / 2)
    assert float(weighted_kl(s, t, torch.ones(2), 1.0)) == pytest.approx(sum(kl) / 2)


def test_alternation_interleaves_then_finishes_the_longer_set():
    assert alternation(2, 4) == [(True, 0), (False, 0), (True, 1), (False, 1), (False, 2), (False, 3)]
    assert alternation(3, 1) == [(True, 0), (False, 0), (True, 1), (True, 2)]
    assert alternation(0, 2) == [(False, 0), (False, 1)]


def test_penultimate_features_are_the_heads_normalised_input(digits):
    model = digits_model(digits).train()
    x = digits[2].x
    feats = penultimate_features(model, x, batch_size=7)
    assert model.training
    with torch.no_grad():
        m = copy.deepcopy(model).eval()
        want = F.normalize(m[1][:-1](m[0](x)), dim=1)
    torch.testing.assert_close(feats, want)


def test_bad_teaching_similarity_prepares_a_retain_pretrained_teacher_and_trains_on_the_subset(digits):
    _, spec, forget, retain = digits
    model = digits_model(digits)
    ctx = digits_context(digits, seed=4)
    params = {"k": 2, "retain_budget": 1.5, "bad_teacher_epochs": 2, "batch_size": 8, "lr": 1e-3, "epochs": 1}
    prep = prepare_method("bad_teaching_similarity", params, model, forget, retain, ctx)
    # the teacher: a fresh model (the context's seed) trained on D_r with the recipe's settings for 2 epochs
    fresh = create_model(spec, seed=4)
    train_model(fresh, retain, Recipe(2, 0.05, 64), seed=4)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(prep[BAD_TEACHER + k], v)
    rand = prepare_method("bad_teaching_similarity", {**params, "bad_teacher": "random"}, model, forget, retain, ctx)
    init = create_model(spec, seed=4).state_dict()
    assert all(torch.equal(rand[BAD_TEACHER + k], v) for k, v in init.items())
    # the subset: at most 1.5 x |D_f| retain examples, votes summing to at most k x |D_f|
    ids, votes = prep["subset_ids"], prep["subset_votes"]
    assert 0 < len(ids) <= 30 and float(votes.sum()) <= 2 * len(forget) and bool((votes >= 1).all())
    assert set(ids.tolist()) <= set(retain.ids().tolist())
    # every batch the student trains on is all forget examples or all chosen retain examples, alternating
    allowed_f = forget.x.flatten(1)
    allowed_r = retain.take(ids.numpy()).x.flatten(1)
    kinds: list[str] = []

    def hook(module, args):
        if torch.is_grad_enabled():
            xb = args[0].flatten(1)
            in_f = (xb[:, None] == allowed_f[None]).all(-1).any(1)
            in_r = (xb[:, None] == allowed_r[None]).all(-1).any(1)
            assert bool(in_f.all()) or bool(in_r.all())
            kinds.append("f" if bool(in_f.all()) else "r")

    handle = model.register_forward_pre_hook(hook)
    ctx.prepared = prep
    run_method("bad_teaching_similarity", params, model, forget, retain, ctx)
    handle.remove()
    assert kinds[:6] == ["f", "r", "f", "r", "f", "r"]
    assert kinds.count("f") == 3 and kinds.count("r") == math.ceil(len(ids) / 8) - (len(ids) % 8 == 1)
    assert ctx.stats["subset_size"] == len(ids)


# ------------------------------------------------------------------ preparations


@pytest.mark.parametrize("name, others", [
    ("ssd", {"selection_weighting": 3.0, "dampening_constant": 0.5, "exponent": 2.0}),
    ("ssd_retain", {"lower_bound": 0.5}),
    ("gisa", {"lr": 0.5, "scaling": "text", "batch_size": 8, "ratio_eps": 1e-3}),
    ("fisher_forgetting", {"alpha": 0.1, "var_cap": 5.0}),
    ("bad_teaching_similarity", {"lr": 0.3, "batch_size": 8, "temperature": 4.0, "weighted": False}),
])
def test_preparation_reads_only_the_hyperparameters_it_names(digits, name, others):
    """The flow keys (and feeds) a preparation with only the hyperparameters its Preparation names."""
    _, _, forget, retain = digits
    named = METHODS[name].prepare.params
    full = validate_params(name, others).model_dump()
    a = prepare_method(name, full, digits_model(digits), forget, retain, digits_context(digits))
    b = prepare_method(name, {k: full[k] for k in named}, digits_model(digits), forget, retain,
                       digits_context(digits))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
