"""Baselines: no update, retraining from scratch, fine-tuning on the retain set, and l1-sparse fine-tuning."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.registry import (MethodParams, NoParams, UnlearnContext, epoch_batches, register,
                                      retain_count)
from rumflow.training import batches_per_epoch, check_loss, minibatches, sgd, train_model


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
    lr: float = Field(0.01, gt=0, description="learning rate (constant)")
    epochs: int = Field(10, ge=0, description="passes over the retain set")


@register("finetune", FinetuneParams)
def finetune(model: nn.Module, forget: Split, retain: Split, p: FinetuneParams,
             ctx: UnlearnContext) -> nn.Module:
    """Fine-tune on the retain set with cross-entropy (catastrophic forgetting of D_f)."""
    gen = ctx.generator()
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)
    losses = ctx.stats["loss"]
    for epoch in range(p.epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=retain.x.device), 0
        for idx in epoch_batches(len(retain), p, gen, retain.x.device):
            loss = F.cross_entropy(model(retain.x[idx]), retain.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, "finetune", epoch))
    return model


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
