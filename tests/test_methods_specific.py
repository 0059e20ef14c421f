"""Method-specific tests: each would have caught a bug of the public RUM / SCRUB / SalUn code."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import rumflow.methods.relabel as relabel
from rumflow.data import Split, load_dataset
from rumflow.errors import DivergenceError
from rumflow.methods import UnlearnContext, random_labels, run_method, salun_mask
from rumflow.methods.common import ensure_finite
from rumflow.models import ModelSpec, create_model
from rumflow.training import Recipe, train_model


@pytest.fixture(scope="module")
def digits():
    """The full digits training set, a small CNN trained on it for 8 epochs, 63 examples to forget."""
    ds = load_dataset("digits")
    spec = ModelSpec("small_cnn", ds.num_classes, ds.in_channels, ds.mean, ds.std)
    model = create_model(spec, seed=0)
    train_model(model, ds.train, Recipe(epochs=8, lr=0.1, batch_size=128), seed=0)
    fid = ds.train.ids()[::20]
    return model.state_dict(), spec, ds.train.take(fid), ds.train.drop(fid)


@pytest.fixture(scope="module")
def tiny(digits):
    """200 examples (20 to forget) and the same trained model: cheap runs."""
    state, spec, _, _ = digits
    ds = load_dataset("digits")
    data = ds.train.take(ds.train.ids()[:200])
    fid = data.ids()[::10]
    return state, spec, data.take(fid), data.drop(fid)


def fresh(setup) -> torch.nn.Module:
    state, spec, _, _ = setup
    model = create_model(spec)
    model.load_state_dict(state)
    return model


def context(setup, seed: int = 0, prepared: dict | None = None) -> UnlearnContext:
    spec = setup[1]
    return UnlearnContext(seed=seed, recipe=Recipe(1, 0.1, 64), fresh_model=lambda: create_model(spec, seed),
                          prepared=prepared)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ SalUn


def brute_force_saliency(model: torch.nn.Module, forget: Split) -> dict[str, torch.Tensor]:
    """|d CE / d theta| over the whole forget set in one eval-mode batch, on a throwaway copy."""
    m = copy.deepcopy(model).eval()
    F.cross_entropy(m(forget.x), forget.y).backward()
    return {n: q.grad.abs() for n, q in m.named_parameters()}


@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.9])
def test_salun_mask_keeps_the_most_salient_fraction(tiny, threshold):
    model = fresh(tiny)
    forget = tiny[2]
    mask = salun_mask(model, forget, threshold, batch_size=7)  # several batches: accumulation must not matter
    sal = brute_force_saliency(model, forget)
    assert mask.keys() == sal.keys()
    kept = torch.cat([sal[n][mask[n]] for n in sal])
    dropped = torch.cat([sal[n][~mask[n]] for n in sal])
    total = kept.numel() + dropped.numel()
    assert kept.numel() == round(threshold * total)
    assert all(m.dtype == torch.bool for m in mask.values())
    # the largest, not the smallest (RUM's copy keeps the bottom fraction): every kept |grad| >= every dropped one
    tol = 1e-6 * float(kept.max())
    assert float(kept.min()) >= float(dropped.max()) - tol
    assert float(kept.mean()) > float(dropped.mean())


def test_salun_mask_leaves_the_model_untouched(tiny):
    model = fresh(tiny).train()
    before = copy.deepcopy(model.state_dict())
    salun_mask(model, tiny[2], 0.5, batch_size=64)
    assert same(model.state_dict(), before)  # weights and BatchNorm running statistics
    assert model.training
    assert all(q.grad is None for q in model.parameters())
    model.eval()
    salun_mask(model, tiny[2], 0.5, batch_size=64)
    assert not model.training


def test_salun_masked_out_weights_stay_bit_identical(tiny, monkeypatch):
    optimizers = []

    def spy_sgd(*args, **kwargs):
        optimizers.append(relabel_sgd(*args, **kwargs))
        return optimizers[-1]

    relabel_sgd = relabel.sgd
    monkeypatch.setattr(relabel, "sgd", spy_sgd)
    model = fresh(tiny)
    start = {n: q.detach().clone() for n, q in model.named_parameters()}
    mask = salun_mask(model, tiny[2], 0.3, batch_size=64)
    ctx = context(tiny)
    # a large weight decay and momentum: without the restore they would move every masked-out weight
    out = run_method("salun", {"threshold": 0.3, "epochs": 3, "batch_size": 64, "lr": 0.05,
                               "weight_decay": 5e-2, "momentum": 0.9}, model, tiny[2], tiny[3], ctx)
    moved = 0
    for n, q in out.named_parameters():
        assert torch.equal(q.detach()[~mask[n]], start[n][~mask[n]]), f"masked-out weights of {n} moved"
        moved += int((q.detach()[mask[n]] != start[n][mask[n]]).sum())
    assert moved > 0.9 * sum(int(m.sum()) for m in mask.values())
    (opt,) = optimizers  # and their momentum was zeroed, so nothing carries over if training continued
    for n, q in out.named_parameters():
        assert not opt.state[q]["momentum_buffer"][~mask[n]].any(), n
    assert ctx.stats["mask_fraction"] == pytest.approx(0.3, abs=1e-4)


def test_salun_with_full_mask_is_random_label(tiny):
    params = {"epochs": 2, "batch_size": 64, "lr": 0.05}
    a = run_method("salun", {**params, "threshold": 1.0}, fresh(tiny), tiny[2], tiny[3], context(tiny))
    b = run_method("random_label", params, fresh(tiny), tiny[2], tiny[3], context(tiny))
    assert same(a.state_dict(), b.state_dict())


def test_salun_uses_a_prepared_mask_from_the_context(tiny):
    model = fresh(tiny)
    start = {n: q.detach().clone() for n, q in model.named_parameters()}
    head = {n: torch.full_like(q, n.startswith("1.12."), dtype=torch.bool) for n, q in model.named_parameters()}
    out = run_method("salun", {"epochs": 1, "batch_size": 64}, model, tiny[2], tiny[3],
                     context(tiny, prepared=head))
    for n, q in out.named_parameters():
        assert torch.equal(q.detach(), start[n]) != n.startswith("1.12."), n
    with pytest.raises(ValueError, match="salun_mask"):
        run_method("salun", {"epochs": 1}, fresh(tiny), tiny[2], tiny[3],
                   context(tiny, prepared={"1.12.weight": head["1.12.weight"]}))


# ------------------------------------------------------------------ random labels


def test_random_labels_are_never_the_true_label_and_cover_every_other_class():
    classes = 10
    y = torch.arange(classes).repeat(2000)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([random_labels(y, classes, gen) for _ in range(5)])
    assert not (draws == y).any()
    for c in range(classes):
        got = draws[:, y == c].flatten()
        counts = torch.bincount(got, minlength=classes)
        assert counts[c] == 0
        expected = got.numel() / (classes - 1)
        others = counts[torch.arange(classes) != c].float()
        assert (others > 0.8 * expected).all() and (others < 1.2 * expected).all(), counts  # uniform over C-1
    assert set(draws.unique().tolist()) == set(range(classes))
    assert not torch.equal(draws[0], draws[1])


def test_random_label_redraws_wrong_labels_every_epoch(tiny, monkeypatch):
    seen = []

    def spy(y, classes, gen):
        out = random_labels(y, classes, gen)
        seen.append((y.clone(), classes, out))
        return out

    monkeypatch.setattr(relabel, "random_labels", spy)
    run_method("random_label", {"epochs": 4, "batch_size": 64}, fresh(tiny), tiny[2], tiny[3], context(tiny))
    assert len(seen) == 4
    for y, classes, out in seen:
        assert classes == 10  # all classes of the model, not just those present in D_f
        assert torch.equal(y, tiny[2].y) and not (out == y).any()
    assert any(not torch.equal(seen[0][2], s[2]) for s in seen[1:])


# ------------------------------------------------------------------ SCRUB

SENTINEL = 123.0  # a pixel value no digit has: marks forget examples as they pass through the model


def test_scrub_counts_max_phases_and_never_updates_the_teacher(tiny):
    _, _, forget, retain = tiny
    marked = Split(forget.x.clone(), forget.y, forget.example_id)
    marked.x[:, 0, 0, 0] = SENTINEL
    for msteps, epochs, expected in [(2, 4, 2), (0, 2, 0), (5, 3, 3), (1, 1, 1)]:
        student = fresh(tiny)
        start = copy.deepcopy(student.state_dict())
        calls = {"max": 0, "teacher_train_mode": 0, "teacher_drift": 0.0, "teacher_calls": 0}

        def hook(module, args):
            x = args[0]
            if module is student:
                if module.training and bool((x[:, 0, 0, 0] == SENTINEL).all()):
                    calls["max"] += 1
                return
            calls["teacher_calls"] += 1
            calls["teacher_train_mode"] += int(module.training)
            calls["teacher_drift"] = max(calls["teacher_drift"], max(
                float((v.float() - start[k].float()).abs().max()) for k, v in module.state_dict().items()))

        student.register_forward_pre_hook(hook)  # deepcopy carries it to the teacher too
        ctx = context(tiny)
        run_method("scrub", {"msteps": msteps, "epochs": epochs, "batch_size": 64, "lr": 0.01},
                   student, marked, retain, ctx)
        assert calls["max"] == expected, (msteps, epochs)  # one forget batch per max phase (20 < 64)
        assert ctx.stats["max_phases"] == expected
        assert len(ctx.stats["loss"]) == epochs and len(ctx.stats["max_loss"]) == expected
        assert calls["teacher_calls"] > 0 and calls["teacher_train_mode"] == 0
        assert calls["teacher_drift"] == 0.0
        assert not same(student.state_dict(), start)


def test_scrub_max_phase_pushes_forget_outputs_away_from_the_teacher(tiny):
    model = fresh(tiny)
    teacher = copy.deepcopy(model).eval()
    out = run_method("scrub", {"msteps": 3, "epochs": 3, "gamma": 0.0, "alpha": 0.0, "lr": 0.01,
                               "batch_size": 64}, model, tiny[2], tiny[3], context(tiny))
    out.eval()
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(out(tiny[2].x), 1), F.softmax(teacher(tiny[2].x), 1), reduction="batchmean")
    assert float(kl) > 1e-3


# ------------------------------------------------------------------ NegGrad, NegGrad+


def test_neggrad_plus_with_a_small_alpha_diverges_on_digits(digits):
    _, _, forget, retain = digits
    # seed 002's failure: the forget term dominates, the loss runs away to -inf
    with pytest.raises(DivergenceError, match=r"neggrad_plus \(rum\) diverged in epoch \d+ .*raise alpha"):
        run_method("neggrad_plus", {"alpha": 0.05, "lr": 0.1, "epochs": 10}, fresh(digits), forget, retain,
                   context(digits))
    ctx = context(digits)  # the same run with a large alpha is fine
    out = run_method("neggrad_plus", {"alpha": 0.99, "lr": 0.1, "epochs": 3}, fresh(digits), forget, retain, ctx)
    assert len(ctx.stats["loss"]) == 3
    ensure_finite(out, "test")


def test_neggrad_plus_scrub_variant_freezes_batchnorm_and_pulls_to_the_start(tiny):
    _, _, forget, retain = tiny
    params = {"epochs": 2, "batch_size": 64, "lr": 0.05, "alpha": 0.5}
    start = fresh(tiny).state_dict()
    stats = [k for k in start if "running_" in k or "num_batches" in k]
    rum = run_method("neggrad_plus", {**params, "variant": "rum"}, fresh(tiny), forget, retain, context(tiny))
    assert any(not torch.equal(rum.state_dict()[k], start[k]) for k in stats)
    scrub = run_method("neggrad_plus", {**params, "variant": "scrub", "l2_pull": 0.0}, fresh(tiny), forget,
                       retain, context(tiny))
    assert all(torch.equal(scrub.state_dict()[k], start[k]) for k in stats)

    def drift(m):
        return sum(float((q.detach() - start[n]).pow(2).sum()) for n, q in m.named_parameters())

    pulled = run_method("neggrad_plus", {**params, "variant": "scrub", "l2_pull": 50.0}, fresh(tiny), forget,
                        retain, context(tiny))
    assert drift(pulled) < drift(scrub)


def test_neggrad_raises_the_forget_loss(tiny):
    _, _, forget, retain = tiny
    model = fresh(tiny)
    with torch.no_grad():
        before = float(F.cross_entropy(copy.deepcopy(model).eval()(forget.x), forget.y))
    out = run_method("neggrad", {"lr": 1e-2, "epochs": 3}, model, forget, retain, context(tiny)).eval()
    with torch.no_grad():
        assert float(F.cross_entropy(out(forget.x), forget.y)) > before


# ------------------------------------------------------------------ l1-sparse


def test_l1_sparse_with_zero_alpha_is_finetune_and_alpha_shrinks_the_weights(tiny):
    _, _, forget, retain = tiny
    params = {"epochs": 2, "batch_size": 64}
    ft = run_method("finetune", params, fresh(tiny), forget, retain, context(tiny))
    l0 = run_method("l1_sparse", {**params, "alpha": 0.0}, fresh(tiny), forget, retain, context(tiny))
    assert same(ft.state_dict(), l0.state_dict())
    l1 = run_method("l1_sparse", {**params, "alpha": 1e-3}, fresh(tiny), forget, retain, context(tiny))

    def norm(m):
        return sum(float(q.detach().abs().sum()) for q in m.parameters())

    assert norm(l1) < norm(l0)


def test_ensure_finite_rejects_broken_weights(tiny):
    model = fresh(tiny)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("inf"))
    with pytest.raises(DivergenceError, match="non-finite weights"):
        ensure_finite(model, "x")
