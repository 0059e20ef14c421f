"""SCRUB (Kurmanji et al. 2023): a student moves away from its frozen teacher on D_f and stays close on D_r."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.registry import MethodParams, UnlearnContext, epoch_batches, register
from rumflow.methods.teachers import distill_kl, frozen_copy
from rumflow.training import check_loss, minibatches, sgd


class ScrubParams(MethodParams):
    lr: float = Field(5e-4, gt=0, description="learning rate (constant)")
    epochs: int = Field(3, ge=0, description="epochs; each runs a max phase (first msteps only) then a min phase")
    msteps: int = Field(2, ge=0, description="number of epochs, counted from the first, that run a max phase on D_f")
    gamma: float = Field(0.99, ge=0, le=1, description="min phase: weight of CE on the retain set")
    alpha: float = Field(0.001, ge=0, le=1, description="min phase: weight of the distillation KL on the retain set")
    temperature: float = Field(4.0, gt=0, description="distillation temperature T")


@register("scrub", ScrubParams)
def scrub(model: nn.Module, forget: Split, retain: Split, p: ScrubParams, ctx: UnlearnContext) -> nn.Module:
    """SCRUB: max phase -KL(teacher) on D_f (first msteps epochs), min phase gamma*CE + alpha*KL on D_r.

    The teacher is a frozen copy of the starting model; KL is the distillation KL at temperature T."""
    gen = ctx.generator()
    device = retain.x.device
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)
    losses = ctx.stats["loss"]
    max_losses = ctx.stats.setdefault("max_loss", [])
    max_phases = 0
    for epoch in range(1, p.epochs + 1):
        model.train()
        if epoch <= p.msteps:  # max phase: forget by moving away from the teacher on D_f
            loss_sum, batches = torch.zeros((), device=device), 0
            for idx in minibatches(len(forget), p.batch_size, gen, device):
                xb = forget.x[idx]
                with torch.no_grad():
                    t_logits = teacher(xb)
                loss = -distill_kl(model(xb), t_logits, p.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                batches += 1
            max_losses.append(check_loss(loss_sum, batches, "scrub (max phase)", epoch - 1))
            max_phases += 1
        # min phase: stay close to the teacher and correct on D_r
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in epoch_batches(len(retain), p, gen, device):
            xb, yb = retain.x[idx], retain.y[idx]
            with torch.no_grad():
                t_logits = teacher(xb)
            logits = model(xb)
            loss = p.gamma * F.cross_entropy(logits, yb) + p.alpha * distill_kl(logits, t_logits, p.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, "scrub (min phase)", epoch - 1))
    ctx.stats["max_phases"] = max_phases
    return model
