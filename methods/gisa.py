"""GISA, Gradient-Informed Synaptic Adjustment (seed 003 §4.5, eqs. 11-13; the report's own method).

No reference code exists. Per-tensor learning rates from the log ratio of SSD's forget and retain
importances (a Preparation), and the loss J = CE_r^2 / (CE_f + eps) on paired (retain, forget) batches.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.parts import OptimizerName, build_optimizer
from rumflow.methods.registry import MethodParams, Preparation, UnlearnContext, epoch_batches, register
from rumflow.methods.ssd import check_importances, importances, prefixed, split_prepared, trainable
from rumflow.training import check_loss, minibatches

class GisaParams(MethodParams):
    lr: float = Field(1e-4, gt=0, description="eta_base, scaled per parameter tensor by eq. 11 (003: Adam 1e-4)")
    epochs: int = Field(1, ge=0, description="passes over D_r, each retain batch paired with a cycled forget batch")
    optimizer: OptimizerName = Field("adam", description="adam (seed 003; momentum unused), adamw, or sgd "
                                     "(with momentum; momentum 0 is eq. 13's plain step)")
    scaling: Literal["formula", "text"] = Field(
        "formula", description="formula: eq. 11, eta_i = eta_base * (1 + m_i) amplifies tensors important to "
        "D_f but not D_r; text: the prose's 'dampened' rate, eta_base / (1 + m_i)")
    ratio_eps: float = Field(1e-8, gt=0, description="eps in log(I_f / (I_r + eps)) (eq. 11)")
    loss_eps: float = Field(1e-6, gt=0, description="eps in CE_r^2 / (CE_f + eps) (eq. 12): the floor of the "
                            "denominator")
    importance_batch_size: int = Field(128, ge=2, description="mini-batch size of both importances "
                                       "(SSD's definition; their scale depends on it)")


def _prepare_gisa(model: nn.Module, forget: Split, retain: Split, p: GisaParams,
                  ctx: UnlearnContext) -> dict[str, torch.Tensor]:
    """I_f over D_f and I_r over D_r (SSD's importances, eval mode)."""
    out = prefixed("forget.", check_importances(importances(model, forget, p.importance_batch_size), "gisa"))
    out.update(prefixed("retain.", check_importances(importances(model, retain, p.importance_batch_size), "gisa")))
    return out


def lr_multipliers(forget_imp: dict[str, torch.Tensor], retain_imp: dict[str, torch.Tensor], eps: float,
                   scaling: str) -> dict[str, float]:
    """Eq. 11 per tensor: m_i = mean(max(log(I_f / (I_r + eps)), 0)); the multiplier is 1 + m_i (formula) or
    1 / (1 + m_i) (text). One host sync for all tensors (the optimizer takes float rates)."""
    names = list(forget_imp)
    if not names:
        return {}
    # I_f = 0 gives log 0 = -inf, clamped to 0: no amplification
    m = torch.stack([torch.log(forget_imp[n] / (retain_imp[n] + eps)).clamp(min=0).mean() for n in names])
    factor = 1 + m if scaling == "formula" else 1 / (1 + m)
    return dict(zip(names, factor.tolist()))


def gisa_loss(retain_ce: torch.Tensor, forget_ce: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 12: J = CE_r^2 / (CE_f + eps): descends on D_r, ascends on D_f (weaker as CE_f grows)."""
    return retain_ce.square() / (forget_ce + eps)


@register("gisa", GisaParams, source="seed 003 §4.5 eqs. 11-13 (no reference code)",
          prepare=Preparation(_prepare_gisa, params=("importance_batch_size",), uses_retain=True))
def gisa(model: nn.Module, forget: Split, retain: Split, p: GisaParams, ctx: UnlearnContext) -> nn.Module:
    """Minimise CE_r^2 / (CE_f + eps) with one learning rate per tensor from its log importance ratio."""
    forget_imp, retain_imp = split_prepared(ctx.prepared, model, ("forget.", "retain."), "GISA")
    mult = lr_multipliers(forget_imp, retain_imp, p.ratio_eps, p.scaling)
    ctx.stats["lr_multipliers"] = mult
    groups = [{"params": [q], "lr": p.lr * mult[n]} for n, q in trainable(model)]
    opt = build_optimizer(model, p.optimizer, p.lr, p.momentum, p.weight_decay, params=groups)  # one group per tensor
    gen = ctx.generator()
    device = retain.x.device
    losses = ctx.stats["loss"]
    forget_batches: list[torch.Tensor] = []
    for epoch in range(p.epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in epoch_batches(len(retain), p, gen, device):
            if not forget_batches:  # a cycled forget iterator, reshuffled each time it runs out
                forget_batches = list(minibatches(len(forget), p.batch_size, gen, device))
            fidx = forget_batches.pop(0)
            retain_ce = F.cross_entropy(model(retain.x[idx]), retain.y[idx])
            forget_ce = F.cross_entropy(model(forget.x[fidx]), forget.y[fidx])
            loss = gisa_loss(retain_ce, forget_ce, p.loss_eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, "gisa", epoch))
    return model
