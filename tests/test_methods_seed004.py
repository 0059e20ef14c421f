"""Seed 004's algorithms (soft relabelling, gradient surgery, activation pruning), Boundary Shrink and the
random-label options: each defining step against a hand computation, each bug of 004's code pinned."""
from __future__ import annotations

import copy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rumflow.methods.relabel as relabel
import rumflow.methods.soft_relabel as soft
from rumflow.artifacts.checkpoints import CheckpointStore
from rumflow.config import ModelConfig
from rumflow.data import load_dataset
from rumflow.errors import ConfigError
from rumflow.methods import METHODS, UnlearnContext, run_method, validate_params
from rumflow.methods.boundary import fgsm_neighbours
from rumflow.methods.pruning import (activation_sites, mask_step_positions, prune_mask, site_quantiles)
from rumflow.methods.surgery import l1_penalty, project_out
from rumflow.models import ModelSpec, attach_activation_masks, create_model, is_activation_mask
from rumflow.runtime import model_from_state
from rumflow.training import Recipe, train_model


@pytest.fixture(scope="module")
def digits():
    """The digits data set and 200 of its training examples (20 to forget), a small CNN trained on them."""
    ds = load_dataset("digits")
    data = ds.train.take(ds.train.ids()[:200])
    fid = data.ids()[::10]
    spec = ModelSpec("small_cnn", ds.num_classes, ds.in_channels, ds.mean, ds.std)
    model = create_model(spec, seed=0)
    train_model(model, data, Recipe(epochs=4, lr=0.05, batch_size=64), seed=0)
    return ds, spec, model.state_dict(), data.take(fid), data.drop(fid)


def parent(digits) -> nn.Module:
    _, spec, state, _, _ = digits
    model = create_model(spec)
    model.load_state_dict(state)
    return model


def context(digits, seed: int = 0, prepared: dict | None = None) -> UnlearnContext:
    spec = digits[1]
    return UnlearnContext(seed=seed, recipe=Recipe(1, 0.1, 64), fresh_model=lambda: create_model(spec, seed),
                          prepared=prepared)


def moved(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, q in model.named_parameters() if not torch.equal(q.detach(), state[n])]


# ------------------------------------------------------------------ 004's deep-copied optimizer (§0 item 4)


def test_a_deep_copied_optimizer_never_moves_the_model():
    model = nn.Linear(3, 2)
    before = model.weight.detach().clone()
    copied = copy.deepcopy(torch.optim.SGD(model.parameters(), lr=1.0))  # 004: nn_optim = deepcopy(optimizer)
    model(torch.ones(1, 3)).sum().backward()
    copied.step()
    assert torch.equal(model.weight, before)  # it stepped detached copies: the document's forget phases
    assert copied.param_groups[0]["params"][0] is not model.weight


@pytest.mark.parametrize("name, params", [
    ("soft_relabel", {"epochs": 2, "relabel_epochs": 2}),          # relabelling only, no fine-tune
    ("gradient_surgery", {"epochs": 2, "ascent_epochs": 2}),        # ascent only, no descent
    ("boundary_shrink", {"epochs": 2, "lr": 1e-3}),                  # forget-only by definition
    ("random_label_permute", {"epochs": 2, "mix_retain": False}),   # 004's RLFTrainer forget phase
])
def test_our_forget_phases_reach_the_returned_model(digits, name, params):
    model = parent(digits)
    start = copy.deepcopy(model.state_dict())
    out = run_method(name, {"batch_size": 16, **params}, model, digits[3], digits[4], context(digits))
    changed = moved(out, start)
    assert len(changed) == len(start_params := dict(out.named_parameters())), \
        f"{name}: only {len(changed)} of {len(start_params)} parameters moved in the forget phase"


# ------------------------------------------------------------------ gradient surgery


def test_projection_removes_the_retain_component_by_hand():
    g_f, g_r = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([2.0, 0.0, 0.0])
    # g_f - (g_f.g_r / g_r.g_r) g_r = [1,2,0] - (2/4)[2,0,0] = [0,2,0]
    assert torch.equal(project_out(g_f, g_r), torch.tensor([0.0, 2.0, 0.0]))
    g_f = torch.tensor([3.0, -1.0, 2.0])
    g_r = torch.tensor([1.0, 1.0, 1.0])  # coefficient (3 - 1 + 2) / 3 = 4/3
    expected = g_f - 4 / 3 * g_r
    assert torch.allclose(project_out(g_f, g_r), expected)
    assert abs(float(project_out(g_f, g_r) @ g_r)) < 1e-6
    assert torch.equal(project_out(g_f, torch.zeros(3)), g_f)  # g_r = 0: guarded, unchanged


def test_projection_conflict_mode_projects_only_when_ascent_would_raise_the_retain_loss():
    g_r = torch.tensor([1.0, 0.0])
    aligned = torch.tensor([1.0, 1.0])   # g_f.g_r > 0: ascending g_f raises CE_r too -> project
    opposed = torch.tensor([-1.0, 1.0])  # g_f.g_r < 0: ascending g_f lowers CE_r -> leave it
    assert torch.equal(project_out(aligned, g_r, "conflict"), torch.tensor([0.0, 1.0]))
    assert torch.equal(project_out(opposed, g_r, "conflict"), opposed)
    assert torch.equal(project_out(opposed, g_r, "always"), torch.tensor([0.0, 1.0]))


def test_one_ascent_step_is_theta_plus_lr_times_the_projected_forget_gradient(digits):
    ds = digits[0]
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    torch.nn.init.normal_(net[1].weight, std=0.3, generator=torch.Generator().manual_seed(1))
    forget = ds.train.take(ds.train.ids()[:12])
    retain = ds.train.take(ds.train.ids()[12:13])  # one retain example: every drawn retain batch is it
    ref = copy.deepcopy(net)
    params = list(ref.parameters())
    g_f = torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(ref(forget.x), forget.y), params)])
    g_r = torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(ref(retain.x), retain.y), params)])
    d = g_f - (g_f @ g_r) / (g_r @ g_r) * g_r
    lr = 0.05
    expected = torch.cat([q.detach().flatten() for q in params]) + lr * d  # ascent: theta + lr * d
    out = run_method("gradient_surgery", {"epochs": 1, "ascent_epochs": 1, "lr": lr, "forget_batch_size": 64},
                     net, forget, retain, context(digits))
    got = torch.cat([q.detach().flatten() for q in out.parameters()])
    assert torch.allclose(got, expected, atol=1e-6)
    # first-order neutral for the retain loss, and it raised the forget loss
    assert abs(float(d @ g_r)) < 1e-4 * float(d.norm() * g_r.norm())
    with torch.no_grad():
        assert F.cross_entropy(out(forget.x), forget.y) > F.cross_entropy(ref(forget.x), forget.y)


def test_l1_penalty_by_hand():
    a, b = torch.tensor([1.0, -3.0]), torch.tensor([[2.0, 0.0], [0.0, -2.0]])
    assert float(l1_penalty([a, b], "mean")) == pytest.approx(2.0 + 1.0)  # mean|a| + mean|b| (004's l1_loss)
    assert float(l1_penalty([a, b], "sum")) == pytest.approx(4.0 + 4.0)


def test_descent_uses_the_elastic_net_loss_and_halves_the_lr(digits, monkeypatch):
    seen = []
    real = torch.optim.lr_scheduler.ExponentialLR.step

    def spy(self, *args, **kwargs):
        seen.append(self.optimizer.param_groups[0]["lr"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.lr_scheduler.ExponentialLR, "step", spy)
    ctx = context(digits)
    run_method("gradient_surgery", {"epochs": 4, "ascent_epochs": 1, "descent_lr": 0.004, "batch_size": 64},
               parent(digits), digits[3], digits[4], ctx)
    assert seen[-3:] == pytest.approx([0.004, 0.002, 0.001])  # three descent epochs, lr halved after each
    assert ctx.stats["ascent_epochs"] == 1 and len(ctx.stats["loss"]) == 4


# ------------------------------------------------------------------ soft relabelling


def test_soft_labels_by_hand():
    h_f = torch.tensor([[0.0, 0.0]])
    h_r = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]])  # distances 5, 1, 2
    y_r = torch.tensor([2, 0, 0])
    for t in (1.0, 2.0):
        w = torch.softmax(torch.tensor([-5.0, -1.0, -2.0]) / t, 0)
        expected = torch.tensor([[w[1] + w[2], 0.0, w[0]]])
        assert torch.allclose(soft.soft_labels(h_f, h_r, y_r, 3, t), expected, atol=1e-6)


def test_soft_relabel_targets_come_from_retain_examples_only(digits, monkeypatch):
    """004 reset the exhausted retain iterator to the *forget* loader; ours cycles D_r."""
    calls = []
    real = soft.soft_labels

    def spy(h_forget, h_retain, y_retain, classes, temperature=1.0):
        calls.append((h_forget, h_retain, y_retain))
        return real(h_forget, h_retain, y_retain, classes, temperature)

    monkeypatch.setattr(soft, "soft_labels", spy)
    train = digits[0].train
    forget = train.take(train.example_id[train.y < 5][:64])  # classes 0-4 are forgotten ...
    retain = train.take(train.example_id[train.y >= 5][:20])  # ... 5-9 retained: 4 forget batches cycle D_r
    model = parent(digits)
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        forget_logits = ref(forget.x)
    run_method("soft_relabel", {"epochs": 1, "relabel_epochs": 1, "batch_size": 16}, model, forget, retain,
               context(digits))
    assert len(calls) == 4
    for h_f, h_r, y_r in calls:
        assert len(h_r) > 0 and (y_r >= 5).all()  # never a forget example standing in for a retain one
        # the similarity is measured by the frozen original model, not by the one being trained
        dist = torch.cdist(h_f, forget_logits, compute_mode="donot_use_mm_for_euclid_dist")
        assert (dist.min(1).values < 1e-3).all()


def test_soft_relabel_penultimate_space(digits, monkeypatch):
    widths = []
    real = soft.soft_labels

    def spy(h_forget, h_retain, y_retain, classes, temperature=1.0):
        widths.append(h_forget.shape[1])
        return real(h_forget, h_retain, y_retain, classes, temperature)

    monkeypatch.setattr(soft, "soft_labels", spy)
    run_method("soft_relabel", {"epochs": 1, "relabel_epochs": 1, "batch_size": 64,
                                "similarity_space": "orig_penultimate"},
               parent(digits), digits[3], digits[4], context(digits))
    assert widths == [128]  # small_cnn's head input, not its 10 logits


# ------------------------------------------------------------------ activation pruning


def test_prune_mask_by_hand():
    # two examples, 4 channels, 1 x 2 positions; batch means: position 0 -> [2, 3, 4, 5], position 1 -> [8, 9, 0, 1]
    a = torch.tensor([[[1.0, 7.0]], [[2.0, 9.0]], [[3.0, 0.0]], [[4.0, 2.0]]])
    b = torch.tensor([[[3.0, 9.0]], [[4.0, 9.0]], [[5.0, 0.0]], [[6.0, 0.0]]])
    act = torch.stack([a, b])  # (2, 4, 1, 2)
    # channel: per position, q = 0.75 of 4 values (linear): pos 0 sorted [2,3,4,5] -> 4.25; pos 1 [0,1,8,9] -> 8.25
    expected_channel = torch.tensor([[[True, True]], [[True, False]], [[True, True]], [[False, True]]])
    assert torch.equal(prune_mask(act, 0.75, "channel"), expected_channel)
    # all: the 8 means [0,1,2,3,4,5,8,9] -> 5 + 0.25 * 3 = 5.75
    expected_all = torch.tensor([[[True, False]], [[True, False]], [[True, True]], [[True, True]]])
    assert torch.equal(prune_mask(act, 0.75, "all"), expected_all)


def test_site_quantiles_interpolate_from_first_to_last():
    assert site_quantiles(5, 0.99, 0.9) == pytest.approx([0.99, 0.9675, 0.945, 0.9225, 0.9])
    assert site_quantiles(1, 0.99, 0.9) == [0.99]


def test_mask_steps_are_spread_over_the_epoch():
    ours = mask_step_positions(4, 20)
    assert ours == [0, 5, 10, 15]
    freq = 20 // 4  # 004: `if n % F_freq and j < F` -> mask steps at n = 1, 2, 3, 4
    buggy, j = [], 0
    for n in range(20):
        if n % freq and j < 4:
            buggy.append(n)
            j += 1
    assert buggy == [1, 2, 3, 4] and ours != buggy
    assert mask_step_positions(3, 2) == [0, 0, 1]  # more forget than retain batches: all still run


class SharedReLU(nn.Module):
    """One ReLU module called twice, like torchvision's BasicBlock."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.relu = nn.Linear(3, 3), nn.Linear(3, 3), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.b(self.relu(self.a(x))))


def test_each_call_of_a_shared_relu_gets_its_own_mask():
    torch.manual_seed(0)
    net = SharedReLU()
    x = torch.randn(5, 3)
    sites = activation_sites(net, x)
    assert [(p, c) for p, c, _ in sites] == [("relu", 0), ("relu", 1)]
    m0, m1 = torch.tensor([True, False, True]), torch.tensor([False, True, True])
    with torch.no_grad():
        expected = (net.b(net.a(x).relu() * m0)).relu() * m1
    attach_activation_masks(net, {"relu.activation_mask_0": m0, "relu.activation_mask_1": m1})
    with torch.no_grad():
        assert torch.allclose(net(x), expected)
        assert torch.allclose(net(x), expected)  # the call counter restarts every forward pass
        twin = copy.deepcopy(net)
        twin.relu.activation_mask_1.fill_(True)  # a deep copy's masks are its own
        assert torch.allclose(net(x), expected) and not torch.allclose(twin(x), expected)


def test_first_mask_is_the_forget_batch_quantile_of_the_parent(digits):
    model = parent(digits)
    forget, retain = digits[3], digits[4]
    first_relu = next(p for p, m in model.named_modules() if isinstance(m, nn.ReLU))
    captured = []
    ref = copy.deepcopy(model).eval()
    ref.get_submodule(first_relu).register_forward_hook(lambda m, a, o: captured.append(o.clone()))
    with torch.no_grad():
        ref(forget.x)
    expected = prune_mask(captured[0], 0.99, "channel")
    out = run_method("activation_pruning", {"epochs": 1, "batch_size": 64, "q_first": 0.99}, model, forget,
                     retain, context(digits))
    mask = out.get_submodule(first_relu).activation_mask_0
    assert torch.equal(mask, expected)
    assert 0 < int((~mask).sum()) < mask.numel()
    # the returned model applies the masks: pruned units of the first ReLU are zero on any input
    acts = []
    handle = out.get_submodule(first_relu).register_forward_hook(lambda m, a, o: acts.append(o))  # runs last
    with torch.no_grad():
        out.eval()(retain.x)
    handle.remove()
    assert acts and (acts[0][:, ~mask] == 0).all() and (acts[0][:, mask] != 0).any()


def test_masks_accumulate_over_forget_batches(digits):
    forget, retain = digits[3], digits[4]
    common = {"epochs": 1, "batch_size": 8}  # 3 forget batches in the prune epoch
    prod = run_method("activation_pruning", {**common, "mask_accumulate": "product"}, parent(digits), forget,
                      retain, context(digits))
    last = run_method("activation_pruning", {**common, "mask_accumulate": "replace"}, parent(digits), forget,
                      retain, context(digits))
    pm = {k: v for k, v in prod.state_dict().items() if is_activation_mask(k)}
    lm = {k: v for k, v in last.state_dict().items() if is_activation_mask(k)}
    assert pm.keys() == lm.keys() and len(pm) == 3  # small_cnn: three ReLU sites
    first = next(iter(pm))
    # product = a union of pruned units, so it prunes at least as much as any single batch
    assert int((~pm[first]).sum()) > int((~lm[first]).sum())


def test_masks_round_trip_through_the_checkpoint_store(digits, tmp_path):
    ds = digits[0]
    out = run_method("activation_pruning", {"epochs": 2, "batch_size": 64}, parent(digits), digits[3], digits[4],
                     context(digits))
    store = CheckpointStore(tmp_path)
    state = store.load_state(store.save(out))
    assert any(is_activation_mask(k) for k in state)
    loaded = model_from_state(ModelConfig(name="small_cnn"), ds, state)
    out.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ds.test.x), out(ds.test.x))
        plain = create_model(digits[1])
        plain.load_state_dict({k: v for k, v in state.items() if not is_activation_mask(k)})
        assert not torch.allclose(plain.eval()(ds.test.x), out(ds.test.x))  # the masks matter
    with pytest.raises(RuntimeError, match="activation_mask_"):
        create_model(digits[1]).load_state_dict(state)  # a plain model cannot take them silently
    # a later step on the masked parent keeps (and can only add to) its masks
    again = run_method("finetune", {"epochs": 1, "batch_size": 64}, loaded, digits[3], digits[4], context(digits))
    kept = {k: v for k, v in again.state_dict().items() if is_activation_mask(k)}
    assert all(torch.equal(kept[k], state[k]) for k in state if is_activation_mask(k))


def test_zero_prune_epochs_attach_no_masks(digits):
    out = run_method("activation_pruning", {"epochs": 2, "prune_epochs": 0, "batch_size": 64}, parent(digits),
                     digits[3], digits[4], context(digits))
    assert not any(is_activation_mask(k) for k in out.state_dict())


# ------------------------------------------------------------------ Boundary Shrink


def test_fgsm_neighbour_by_hand():
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(2))
    x = torch.tensor([[[[0.5, 0.5]]]])
    # p = [0.5, 0.5]; d CE / dx = -(W_0 - p W) = -([1, 0] - [0.5, 0.5]) = [-0.5, 0.5]: sign [-1, 1]
    x_adv, label = fgsm_neighbours(net, x, torch.tensor([0]), 0.1)
    assert torch.allclose(x_adv, torch.tensor([[[[0.4, 0.6]]]]), atol=1e-6) and label.tolist() == [1]
    x = torch.tensor([[[[0.05, 0.98]]]])  # clamped into [0, 1]
    x_adv, _ = fgsm_neighbours(net, x, torch.tensor([0]), 0.1, discretize=False)
    assert torch.equal(x_adv, torch.tensor([[[[0.0, 1.0]]]]))
    assert all(q.grad is None for q in net.parameters())
    x_adv, _ = fgsm_neighbours(net, torch.tensor([[[[0.3, 0.2]]]]), torch.tensor([1]), 0.0123)
    assert torch.equal(x_adv * 255, torch.round(x_adv * 255))  # on the 8-bit grid


def test_boundary_shrink_targets_come_from_the_frozen_original(digits):
    """004 perturbed with the model being trained; the method attacks the starting model once."""
    model = parent(digits)
    forget = digits[3]
    ref = copy.deepcopy(model).eval()
    _, expected = fgsm_neighbours(ref, forget.x, forget.y, 0.1)
    ctx = context(digits)
    out = run_method("boundary_shrink", {"epochs": 3, "lr": 1e-2, "batch_size": 8}, model, forget, digits[4], ctx)
    assert torch.equal(ctx.prepared["neighbour_labels"], expected)
    assert (expected != forget.y).float().mean() > 0.5  # FGSM crossed the boundary for most examples
    with torch.no_grad():  # trained towards the neighbour classes
        before = F.cross_entropy(ref(forget.x), expected)
        after = F.cross_entropy(out.eval()(forget.x), expected)
    assert after < before
    with pytest.raises(ValueError, match="neighbour labels"):
        run_method("boundary_shrink", {"epochs": 1}, parent(digits), forget, digits[4],
                   context(digits, prepared={"neighbour_labels": expected[:3]}))


# ------------------------------------------------------------------ random labels: options and presets


def test_redraw_over_all_classes_can_keep_the_true_label():
    y = torch.arange(10).repeat(1000)
    fake = relabel.epoch_labels(y, 10, "redraw", False, torch.Generator().manual_seed(0))
    same = float((fake == y).float().mean())
    assert same == pytest.approx(0.1, abs=0.02)
    counts = torch.bincount(fake, minlength=10).float()
    assert (counts > 0.85 * counts.mean()).all()


def test_permute_in_batch_shuffles_each_batch_among_its_forget_examples(digits, monkeypatch):
    seen = []
    real = relabel.F.cross_entropy

    def spy(logits, target, *args, **kwargs):
        seen.append(target.clone())
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(relabel.F, "cross_entropy", spy)
    forget = digits[3]
    run_method("random_label_permute", {"epochs": 2, "batch_size": 64, "mix_retain": False}, parent(digits),
               forget, digits[4], context(digits))
    assert len(seen) == 2  # one batch per epoch: D_f alone (20 examples)
    for target in seen:
        assert torch.equal(torch.sort(target).values, torch.sort(forget.y).values)  # the same labels ...
    assert any(not torch.equal(t, forget.y) for t in seen)  # ... handed to other examples


def test_presets_and_the_contradictory_option():
    assert METHODS["amnesiac"].preset_of == "random_label"
    p = validate_params("amnesiac", {})
    assert p.exclude_true_label and p.label_mode == "redraw" and p.mix_retain
    q = validate_params("random_label_permute", {})
    assert q.label_mode == "permute_in_batch" and not q.exclude_true_label and q.epochs == 20
    with pytest.raises(ConfigError, match="permute_in_batch cannot exclude the true label"):
        validate_params("random_label", {"label_mode": "permute_in_batch"})
