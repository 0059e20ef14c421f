"""Baselines: no update, retraining from scratch, fine-tuning on the retain set, and l1-sparse fine-tuning."""
from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.registry import (MethodParams, NoParams, UnlearnContext, epoch_batches, register,
                                      register_preset, retain_count)
from rumflow.training import batches_per_epoch, check_loss, sgd, train_model


@register("none", NoParams)
def no_update(model: nn.Module, forget: Split, retain: Split, p: NoParams, ctx: UnlearnContext) -> nn.Module:
    """Leave the model as it is (RUM's choice for the low tier on CIFAR-10)."""
    return model


@register("retrain", NoParams, needs_forget=False)
def retrain(model: nn.Module, forget: Split, retain: Split, p: NoParams, ctx: UnlearnContext) -> nn.Module:
    """Train a fresh model from scratch on the retain set with the original recipe."""
    fresh = ctx.fresh_model().to(retain.x.device)
    result = train_model(fresh, retain, ctx.recipe, seed=ctx.seed, augment=ctx.augment)
    ctx.stats["loss"].append(result.mean_loss)
    ctx.stats["examples"] = ctx.recipe.epochs * len(retain)
    return fresh


class FinetuneParams(MethodParams):
    lr: float = Field(0.01, gt=0, description="learning rate (the starting one under a schedule)")
    epochs: int = Field(10, ge=0, description="passes over the retain set")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning rate over the epochs: "
                                                    "constant, or cosine annealing to 0 stepped once per epoch "
                                                    "(CosineAnnealingLR(T_max=epochs), seed 000 Alg. 1)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="sgd (with momentum and weight "
                                                       "decay), adam or adamw (momentum unused)")


def make_optimizer(params: list[nn.Parameter], p: MethodParams) -> torch.optim.Optimizer:
    """The optimizer `p` names (SGD when it names none), over exactly `params`."""
    kind = getattr(p, "optimizer", "sgd")
    if kind == "adam":
        return torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)


def retain_epoch(model: nn.Module, retain: Split, p: MethodParams, opt: torch.optim.Optimizer,
                 gen: torch.Generator, train: Callable[[], None], label_smoothing: float = 0.0,
                 max_batches: int | None = None) -> tuple[torch.Tensor, int]:
    """One budgeted, shuffled pass over D_r with CE (the first `max_batches` of it when given):
    (the summed loss on the device, the number of batches)."""
    train()
    loss_sum, batches = torch.zeros((), device=retain.x.device), 0
    for idx in epoch_batches(len(retain), p, gen, retain.x.device):
        if max_batches is not None and batches >= max_batches:
            break
        loss = F.cross_entropy(model(retain.x[idx]), retain.y[idx], label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach()
        batches += 1
    return loss_sum, batches


def finetune_loop(model: nn.Module, retain: Split, p: FinetuneParams, ctx: UnlearnContext, what: str,
                  chosen: list[tuple[str, nn.Module]] | None = None) -> nn.Module:
    """`p.epochs` retain epochs of CE training only the `chosen` blocks (all when None), in place."""
    from rumflow.methods.layers import Freeze  # layers builds on this module

    gen = ctx.generator()
    losses = ctx.stats["loss"]
    with Freeze(model, chosen, getattr(p, "frozen_bn", "eval")) as fz:
        opt = make_optimizer(fz.params, p)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(p.epochs, 1))
                 if p.schedule == "cosine" else None)
        for epoch in range(p.epochs):
            loss_sum, batches = retain_epoch(model, retain, p, opt, gen, fz.train, p.label_smoothing)
            if sched is not None:
                sched.step()
            losses.append(check_loss(loss_sum, batches, what, epoch))
    return model


@register("finetune", FinetuneParams)
def finetune(model: nn.Module, forget: Split, retain: Split, p: FinetuneParams,
             ctx: UnlearnContext) -> nn.Module:
    """Fine-tune on the retain set with cross-entropy (catastrophic forgetting of D_f)."""
    return finetune_loop(model, retain, p, ctx, "finetune")


register_preset("finetune_cosine", "finetune", "seed 000 Alg. 1 (the NeurIPS'23 starting kit, 100 epochs)",
                "Fine-tune on the retain set with CE, SGD lr 0.001 annealed by a cosine over 100 epochs.",
                lr=0.001, epochs=100, batch_size=128, schedule="cosine")
register_preset("finetune_benchmark", "finetune", "seed 001 §2.2 (benchmark 'Fine-tuning', ndb796)",
                "Fine-tune on the retain set with CE, plain SGD lr 0.001 for 2 epochs (batch 64, train mode).",
                lr=0.001, epochs=2, batch_size=64, momentum=0.0, weight_decay=0.0)


class L1SparseParams(MethodParams):
    alpha: float = Field(1e-4, ge=0, le=1, description="initial weight a_0 of the l1 penalty ||theta||_1; "
                         "a_t decays linearly to 0 over the run's optimizer steps")
    lr: float = Field(0.01, gt=0, description="learning rate (constant)")
    epochs: int = Field(10, ge=0, description="passes over the retain set")


@register("l1_sparse", L1SparseParams)
def l1_sparse(model: nn.Module, forget: Split, retain: Split, p: L1SparseParams,
              ctx: UnlearnContext) -> nn.Module:
    """Fine-tune on the retain set with CE + a_t * ||theta||_1, a_t = alpha * (1 - t / T) over T steps."""
    gen = ctx.generator()
    device = retain.x.device
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)
    params = [q for q in model.parameters() if q.requires_grad]
    total = p.epochs * batches_per_epoch(retain_count(len(retain), p), p.batch_size)
    losses = ctx.stats["loss"]
    step = 0
    for epoch in range(p.epochs):
        model.train()
        ce_sum, batches = torch.zeros((), device=device), 0
        for idx in epoch_batches(len(retain), p, gen, device):
            a_t = p.alpha * (1 - step / total)
            ce = F.cross_entropy(model(retain.x[idx]), retain.y[idx])
            l1 = torch.stack([q.abs().sum() for q in params]).sum()
            loss = ce + a_t * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ce_sum += ce.detach()  # the data term: the penalty is bounded by the (finite) weights
            batches += 1
            step += 1
        losses.append(check_loss(ce_sum, batches, "l1_sparse", epoch))
    return model
