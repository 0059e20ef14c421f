"""GLI, Guided Loss-Increasing (seed 001; Choi et al.): train on retain images perturbed so that the model's
outputs on them move away from its outputs on forget images while they stay classified as their own label."""
from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.errors import ConfigError
from rumflow.methods.parts import ForgetStream, forward_features
from rumflow.methods.registry import MethodParams, UnlearnContext, epoch_batches, register, retain_count
from rumflow.training import accuracy, batches_per_epoch, check_loss, sgd

Distance = Literal["mse", "l1", "l2", "cosine"]
FeatureSpace = Literal["logits", "penultimate"]


class GLIParams(MethodParams):
    lr: float = Field(1e-3, gt=0, description="learning rate of the model's SGD step (constant)")
    epochs: int = Field(1, ge=0, description="passes over the retain set")
    batch_size: int = Field(64, ge=2, description="retain images per batch (each gets a forget partner)")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (GLI: plain SGD)")
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay (GLI: none)")
    w0: float = Field(200.0, ge=0, description="guide weight w on the CE term at an epoch's first retain batch")
    w1: float = Field(1000.0, ge=0, description="guide weight at the epoch's last batch (linear in between)")
    noise_steps: int = Field(2, ge=0, description="K: sign-gradient steps on the perturbation per batch "
                             "(001: 2 on MUFAC, 5 on MUCAC)")
    noise_step: float = Field(0.01, gt=0, description="size of each sign step on the perturbation (so its "
                              "max-norm is at most noise_steps * noise_step)")
    distance: Distance = Field("mse", description="distance pushed up between perturbed-retain and forget "
                               "features: mse (the code's 'L2'), l1, l2 (Euclidean norm) or cosine (-cos)")
    feature_space: FeatureSpace = Field("logits", description="where the distance is taken: logits (the code) "
                                        "or penultimate (the input of the final linear layer)")
    bn_mode: Literal["train", "eval"] = Field(
        "train", description="mode of the model's update step (the code drifts into eval from its 2nd batch)")
    select_on: Literal["none", "val"] = Field(
        "none", description="none: return the last state; val: keep the state with the best accuracy on the "
        "validation split (ctx.val), checked every select_every batches (the code selects on the test set)")
    select_every: int = Field(10, ge=1, description="select_on val: retain batches between validation checks")
    patience: int = Field(3, ge=1, description="select_on val: stop after this many checks without improvement")


def distance_loss(a: torch.Tensor, b: torch.Tensor, kind: Distance) -> torch.Tensor:
    """Batch-mean distance between rows of a and b: mse (mean squared error over all entries), l1 / l2
    (per-row norms of a - b), cosine (-cos, so that maximising it pushes the directions apart)."""
    if kind == "mse":
        return F.mse_loss(a, b)
    if kind == "l1":
        return (a - b).abs().sum(1).mean()
    if kind == "l2":
        return (a - b).pow(2).sum(1).clamp_min(1e-12).sqrt().mean()  # clamp: the norm's gradient at 0
    return -F.cosine_similarity(a, b, dim=1).mean()


def guide_weight(b: int, batches: int, w0: float, w1: float) -> float:
    """GLI's linear_weight_scheduler: w0 at batch 0 of an epoch, w1 at its last batch."""
    return w0 if batches < 2 else w0 + (w1 - w0) * b / (batches - 1)


def gli_perturb(model: nn.Module, x_r: torch.Tensor, y_r: torch.Tensor, target: torch.Tensor, w: float,
                steps: int, step_size: float, distance: Distance, space: FeatureSpace) -> torch.Tensor:
    """The 'mixed' images: K steps of delta += step * sign(grad_delta J), J = d(f(x_p), target) - w CE(f(x_p), y_r),
    x_p = clamp(x_r + delta, 0, 1) from delta = 0; returns x_p detached. The model is used in its current mode
    and its parameters get no gradient."""
    delta = torch.zeros_like(x_r)
    with torch.enable_grad():  # also when the caller is under no_grad
        for _ in range(steps):
            delta.requires_grad_(True)
            logits, feats = forward_features(model, (x_r + delta).clamp(0, 1), space)
            j = distance_loss(feats, target, distance) - w * F.cross_entropy(logits, y_r)
            (grad,) = torch.autograd.grad(j, delta)
            delta = (delta + step_size * grad.sign()).detach()
    return (x_r + delta).clamp(0, 1).detach()


class _Selector:
    """Best-on-validation selection: a real copy of the best state, early stopping on patience."""

    def __init__(self, model: nn.Module, val: Split, patience: int, ctx: UnlearnContext):
        self.model, self.val, self.patience = model, val, patience
        self.best, self.state, self.since = -math.inf, None, 0
        self.scores = ctx.stats.setdefault("val_scores", [])

    def check(self, step: int) -> bool:
        """Score the current state on ctx.val (eval mode); True when patience has run out."""
        score = accuracy(self.model, self.val)  # one sync per check, never per batch
        self.scores.append(score)
        if score > self.best:
            self.best, self.state, self.since, self.step = score, copy.deepcopy(self.model.state_dict()), 0, step
            return False
        self.since += 1
        return self.since >= self.patience


@register("gli", GLIParams, source="seed 001 §2-3 and its code (Dasol-Choi/Guided_Loss_Increasing)")
def gli(model: nn.Module, forget: Split, retain: Split, p: GLIParams, ctx: UnlearnContext) -> nn.Module:
    """Guided Loss-Increasing: SGD on CE of retain images perturbed away from paired forget images' outputs.

    Per retain batch: each image gets the next forget image of a cycled stream as its partner (no pair is
    skipped); the forget features and the perturbation search use eval mode; the update uses `bn_mode`."""
    if p.select_on == "val" and (ctx.val is None or len(ctx.val) == 0):
        raise ConfigError("gli with select_on: val needs validation data in the context (ctx.val); pass the "
                          "validation split or set select_on: none.")
    gen = ctx.generator()
    device = retain.x.device
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)
    stream = ForgetStream(len(forget), gen, device)
    selector = _Selector(model, ctx.val, p.patience, ctx) if p.select_on == "val" else None
    per_epoch = batches_per_epoch(retain_count(len(retain), p), p.batch_size)
    losses, step, stop = ctx.stats["loss"], 0, False
    for epoch in range(p.epochs):
        loss_sum, batches = torch.zeros((), device=device), 0
        for b, idx in enumerate(epoch_batches(len(retain), p, gen, device)):
            x_r, y_r = retain.x[idx], retain.y[idx]
            model.eval()  # the search scores the model as it is: no BatchNorm statistics from perturbed images
            with torch.no_grad():
                _, target = forward_features(model, forget.x[stream.take(int(idx.shape[0]))], p.feature_space)
            x_p = gli_perturb(model, x_r, y_r, target, guide_weight(b, per_epoch, p.w0, p.w1), p.noise_steps,
                              p.noise_step, p.distance, p.feature_space)
            model.train(p.bn_mode == "train")
            loss = F.cross_entropy(model(x_p), y_r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
            step += 1
            if selector is not None and step % p.select_every == 0 and selector.check(step):
                stop = True
                break
        losses.append(check_loss(loss_sum, batches, "gli", epoch))
        if stop:
            break
    if selector is not None:
        if not stop and step % p.select_every != 0:
            selector.check(step)  # the final state is a candidate too
        if selector.state is not None:
            model.load_state_dict(selector.state)
            ctx.stats["selected_step"] = selector.step
    return model
