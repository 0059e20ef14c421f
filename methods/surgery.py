"""Gradient surgery (seed 004 §3.2, eq. (3)): ascent on the forget loss along the part of its gradient that is
orthogonal to the retain gradient, then descent on D_r with an elastic-net penalty."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.parts import OptimizerName, build_optimizer
from rumflow.methods.registry import MethodParams, UnlearnContext, epoch_batches, register, retain_sample
from rumflow.training import check_loss, minibatches


class GradientSurgeryParams(MethodParams):
    lr: float = Field(0.09, gt=0, description="ascent phase: SGD learning rate")
    epochs: int = Field(7, ge=0, description="total epochs: the first ascent_epochs are ascent passes over D_f, "
                        "the rest descent passes over D_r (004: 3 + 4)")
    ascent_epochs: int = Field(3, ge=0, description="how many of the epochs, counted from the first, are ascent "
                               "passes over D_f")
    ascent_momentum: float = Field(0.95, ge=0, lt=1, description="ascent phase: SGD momentum (no weight decay)")
    forget_batch_size: int = Field(2048, ge=1, description="ascent phase: forget batch size; each forget batch is "
                                   "paired with a retain batch of the same size drawn with replacement")
    projection: Literal["always", "conflict"] = Field(
        "always", description="always: remove the retain-gradient component every step (004); conflict: only "
        "when g_f . g_r > 0, i.e. when ascending g_f would raise the retain loss")
    descent_lr: float = Field(2e-3, gt=0, description="descent phase: initial learning rate")
    lr_decay: float = Field(0.5, gt=0, le=1, description="descent phase: learning rate multiplied by this after "
                            "every descent epoch (ExponentialLR)")
    optimizer: OptimizerName = Field("adamw", description="descent phase optimizer (004: AdamW)")
    momentum: float = Field(0.9, ge=0, lt=1, description="descent phase: SGD momentum (optimizer sgd only)")
    weight_decay: float = Field(5e-4, ge=0, description="descent phase: weight decay (the elastic net's l2 part)")
    l1: float = Field(1e-3, ge=0, description="descent phase: weight of the l1 penalty")
    l1_mode: Literal["mean", "sum"] = Field(
        "mean", description="mean: sum over tensors of mean |theta| (004's F.l1_loss per tensor); sum: ||theta||_1")


def project_out(g_f: torch.Tensor, g_r: torch.Tensor, projection: str = "always") -> torch.Tensor:
    """g_f - (g_f . g_r / g_r . g_r) g_r, the forget gradient orthogonal to the retain gradient (eq. (3)).

    g_f is returned unchanged when g_r = 0 and, with projection 'conflict', when g_f . g_r <= 0."""
    dot = g_f @ g_r
    norm = g_r @ g_r
    coef = torch.where(norm > 0, dot / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(dot))
    if projection == "conflict":
        coef = torch.where(dot > 0, coef, torch.zeros_like(coef))
    return g_f - coef * g_r


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """d loss / d params as one vector (zeros for parameters the loss does not reach)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1) for q, g in zip(params, grads)])


def l1_penalty(params: list[torch.Tensor], mode: str) -> torch.Tensor:
    """Sum over tensors of mean |theta| (mode 'mean', 004's code) or of sum |theta| (mode 'sum')."""
    if mode == "mean":
        return torch.stack([q.abs().mean() for q in params]).sum()
    return torch.stack([q.abs().sum() for q in params]).sum()


def _ascent_epoch(model: nn.Module, forget: Split, retain: Split, p: GradientSurgeryParams,
                  opt: torch.optim.Optimizer, params: list[torch.Tensor],
                  gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """One pass over D_f: each step ascends CE_f along its gradient minus the projection on a retain gradient."""
    device = forget.x.device
    sample = retain_sample(len(retain), p, gen)
    pool = torch.arange(len(retain)) if sample is None else sample
    loss_sum, batches = torch.zeros((), device=device), 0
    for fidx in minibatches(len(forget), p.forget_batch_size, gen, device):
        ce_f = F.cross_entropy(model(forget.x[fidx]), forget.y[fidx])
        g_f = _flat_grad(ce_f, params)
        if len(pool):
            ridx = pool[torch.randint(len(pool), (len(fidx),), generator=gen)].to(device)
            g_r = _flat_grad(F.cross_entropy(model(retain.x[ridx]), retain.y[ridx]), params)
        else:
            g_r = torch.zeros_like(g_f)
        direction = project_out(g_f, g_r, p.projection)
        offset = 0
        for q in params:  # the optimizer descends, so hand it -direction: ascent along g_f's orthogonal part
            q.grad = -direction[offset:offset + q.numel()].view_as(q)
            offset += q.numel()
        opt.step()
        loss_sum += ce_f.detach()
        batches += 1
    return loss_sum, batches


@register("gradient_surgery", GradientSurgeryParams, source="seed 004 §3.2 eq. (3); unl_algorithms/surgery.py")
def gradient_surgery(model: nn.Module, forget: Split, retain: Split, p: GradientSurgeryParams,
                     ctx: UnlearnContext) -> nn.Module:
    """Ascent on CE_f along g_f minus its projection on g_r, then CE_r + l1 descent with decaying lr."""
    gen = ctx.generator()
    device = retain.x.device
    # only trainable tensors, so the flattened gradient and the parameters line up (004 assumed all of them)
    params = [q for q in model.parameters() if q.requires_grad]
    losses = ctx.stats["loss"]
    n_ascent = min(p.ascent_epochs, p.epochs)
    ascent = torch.optim.SGD(params, lr=p.lr, momentum=p.ascent_momentum, weight_decay=0.0)
    for epoch in range(n_ascent):
        model.train()
        loss_sum, batches = _ascent_epoch(model, forget, retain, p, ascent, params, gen)
        losses.append(check_loss(loss_sum, batches, "gradient_surgery (ascent)", epoch))
    ctx.stats["ascent_epochs"] = n_ascent
    descent = build_optimizer(model, p.optimizer, p.descent_lr, p.momentum, p.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(descent, gamma=p.lr_decay)
    for epoch in range(n_ascent, p.epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in epoch_batches(len(retain), p, gen, device):
            loss = F.cross_entropy(model(retain.x[idx]), retain.y[idx]) + p.l1 * l1_penalty(params, p.l1_mode)
            descent.zero_grad(set_to_none=True)
            loss.backward()
            descent.step()
            loss_sum += loss.detach()
            batches += 1
        sched.step()
        losses.append(check_loss(loss_sum, batches, "gradient_surgery (descent)", epoch))
    return model
