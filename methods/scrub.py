"""SCRUB (Kurmanji et al. 2023): a student moves away from its frozen teacher on D_f and stays close on D_r."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.parts import OptimizerName, build_optimizer
from rumflow.methods.registry import MethodParams, UnlearnContext, epoch_batches, register, register_preset
from rumflow.methods.teachers import distill_kl, frozen_copy
from rumflow.training import check_loss, minibatches, sgd


class ScrubParams(MethodParams):
    lr: float = Field(5e-4, gt=0, description="learning rate (constant)")
    epochs: int = Field(3, ge=0, description="epochs; each runs a max phase (first msteps only) and a min phase")
    msteps: int | None = Field(2, ge=0, description="number of epochs, counted from the first, that run a max "
                               "phase on D_f; null = every epoch (the MUFAC benchmark)")
    gamma: float = Field(0.99, ge=0, description="min phase: weight of CE on the retain set")
    alpha: float = Field(0.001, ge=0, le=1, description="min phase: weight of the distillation KL on the retain set")
    temperature: float = Field(4.0, gt=0, description="distillation temperature T")
    order: Literal["forget_first", "retain_first"] = Field(
        "forget_first", description="within an epoch: the max phase on D_f first (SCRUB's code) or the min "
        "phase on D_r first (the MUFAC benchmark, 001 Alg. 4)")
    optimizer: OptimizerName = Field("sgd", description="sgd (with momentum), adam or adamw; one optimizer "
                                     "serves both phases")


def _max_phase(model: nn.Module, teacher: nn.Module, forget: Split, p: ScrubParams, gen: torch.Generator,
               opt: torch.optim.Optimizer, epoch: int) -> float:
    """One pass over D_f minimising -KL_T(student, teacher): move away from the teacher."""
    device = forget.x.device
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
    return check_loss(loss_sum, batches, "scrub (max phase)", epoch - 1)


def _min_phase(model: nn.Module, teacher: nn.Module, retain: Split, p: ScrubParams, gen: torch.Generator,
               opt: torch.optim.Optimizer, epoch: int) -> float:
    """One (budgeted) pass over D_r minimising gamma * CE + alpha * KL_T: stay close and correct."""
    device = retain.x.device
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
    return check_loss(loss_sum, batches, "scrub (min phase)", epoch - 1)


@register("scrub", ScrubParams)
def scrub(model: nn.Module, forget: Split, retain: Split, p: ScrubParams, ctx: UnlearnContext) -> nn.Module:
    """SCRUB: max phase -KL(teacher) on D_f (first msteps epochs), min phase gamma*CE + alpha*KL on D_r.

    The teacher is a frozen copy of the starting model; KL is the distillation KL at temperature T.
    `order` says which phase comes first within an epoch; the student is in train mode in both."""
    gen = ctx.generator()
    teacher = frozen_copy(model)
    opt = (sgd(model, p.lr, p.momentum, p.weight_decay) if p.optimizer == "sgd"
           else build_optimizer(model, p.optimizer, p.lr, p.momentum, p.weight_decay))
    losses = ctx.stats["loss"]
    max_losses = ctx.stats.setdefault("max_loss", [])
    max_phases = 0
    for epoch in range(1, p.epochs + 1):
        model.train()
        run_max = p.msteps is None or epoch <= p.msteps
        if p.order == "retain_first":
            losses.append(_min_phase(model, teacher, retain, p, gen, opt, epoch))
        if run_max:
            max_losses.append(_max_phase(model, teacher, forget, p, gen, opt, epoch))
            max_phases += 1
        if p.order == "forget_first":
            losses.append(_min_phase(model, teacher, retain, p, gen, opt, epoch))
    ctx.stats["max_phases"] = max_phases
    return model


register_preset("scrub_benchmark", "scrub", "seed 001 §6.4 Alg. 4 (MUFAC benchmark, ndb796)",
                "The MUFAC benchmark's SCRUB: per epoch CE + KL_4 on D_r, then -KL_4 on D_f, every epoch; plain SGD.",
                order="retain_first", msteps=None, gamma=1.0, alpha=1.0, temperature=4.0, lr=1e-3, epochs=2,
                batch_size=64, momentum=0.0, weight_decay=0.0)

register_preset("scrub_004", "scrub", "seed 004 §4.4 baseline 'SCRUBS' (sachit3022/unlearning)",
                "Seed 004's SCRUB: gamma 3, alpha 0.1, T 1, a max phase every epoch, AdamW 1e-3, 10 epochs "
                "(with a true KL: 004's code feeds probabilities to KLDivLoss).",
                gamma=3.0, alpha=0.1, temperature=1.0, msteps=None, optimizer="adamw", lr=1e-3, epochs=10,
                weight_decay=0.01)
