"""Gradient ascent on the forget set, alone (NegGrad) or balanced against the retain set (NegGrad+)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.registry import MethodParams, UnlearnContext, epoch_batches, register
from rumflow.training import check_loss, minibatches, sgd


class NegGradParams(MethodParams):
    lr: float = Field(1e-4, gt=0, description="learning rate (constant; very sensitive: SalUn's maintainers "
                      "suggest 5e-4..1e-3 on CIFAR)")
    epochs: int = Field(5, ge=0, description="passes over the forget set")


@register("neggrad", NegGradParams)
def neggrad(model: nn.Module, forget: Split, retain: Split, p: NegGradParams, ctx: UnlearnContext) -> nn.Module:
    """Gradient ascent on the forget set: minimise -CE(forget) (GA)."""
    gen = ctx.generator()
    device = forget.x.device
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)
    losses = ctx.stats["loss"]
    for epoch in range(p.epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in minibatches(len(forget), p.batch_size, gen, device):
            loss = -F.cross_entropy(model(forget.x[idx]), forget.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, "neggrad", epoch))
    return model


class NegGradPlusParams(MethodParams):
    alpha: float = Field(0.99, ge=0, le=1, description="weight of the retain loss; 1 - alpha weighs the forget loss")
    lr: float = Field(0.01, gt=0, description="learning rate (constant)")
    epochs: int = Field(5, ge=0, description="passes over the retain set")
    variant: Literal["rum", "scrub"] = Field(
        "rum", description="rum: train-mode BatchNorm, no pull (RUM's code); scrub: the SCRUB paper's baseline, "
        "BatchNorm in eval mode (running statistics frozen) plus a pull towards the starting weights")
    l2_pull: float = Field(5e-4, ge=0, description="variant scrub only: coefficient c of "
                           "(c / 2) * ||theta - theta_start||^2 added to the loss")


def _freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: it normalises with, and no longer updates, its running stats."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@register("neggrad_plus", NegGradPlusParams)
def neggrad_plus(model: nn.Module, forget: Split, retain: Split, p: NegGradPlusParams,
                 ctx: UnlearnContext) -> nn.Module:
    """alpha * CE(retain batch) - (1 - alpha) * CE(cycled forget batch); an epoch is one pass over D_r."""
    gen = ctx.generator()
    device = retain.x.device
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)
    scrub = p.variant == "scrub"
    params = [q for q in model.parameters() if q.requires_grad]
    start = [q.detach().clone() for q in params] if scrub else []
    losses = ctx.stats["loss"]
    forget_batches: list[torch.Tensor] = []
    for epoch in range(p.epochs):
        model.train()
        if scrub:
            _freeze_batchnorm(model)
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in epoch_batches(len(retain), p, gen, device):
            if not forget_batches:
                forget_batches = list(minibatches(len(forget), p.batch_size, gen, device))
            fidx = forget_batches.pop(0)
            loss = (p.alpha * F.cross_entropy(model(retain.x[idx]), retain.y[idx])
                    - (1 - p.alpha) * F.cross_entropy(model(forget.x[fidx]), forget.y[fidx]))
            if scrub and p.l2_pull > 0:
                loss = loss + p.l2_pull / 2 * torch.stack(
                    [(q - q0).pow(2).sum() for q, q0 in zip(params, start)]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, f"neggrad_plus ({p.variant})", epoch))
    return model
