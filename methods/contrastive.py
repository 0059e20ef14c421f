"""Contrastive fine-tuning, the NeurIPS 2023 unlearning challenge's 2nd place ("Fanchuan"; seed 003 §6.1.2).

Stage 1 pushes the forget predictions towards uniform (KL(U || softmax f(x_f))). Stage 2 alternates a
contrastive round, in which each forget sample's logit-similarity distribution over a retain batch is
pushed towards uniform, and a cross-entropy round over D_r. Follows the two public re-implementations
(no positive pair, no augmentation: the "equal probability" loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.registry import MethodParams, UnlearnContext, epoch_batches, register, retain_count
from rumflow.training import batches_per_epoch, check_loss, minibatches, sgd


class ContrastiveParams(MethodParams):
    lr: float = Field(0.004, gt=0, description="retain round learning rate (the reference's 0.001 * batch / 64 "
                      "at batch 256)")
    epochs: int = Field(8, ge=0, description="adversarial epochs, each a contrastive round then a retain round")
    uniform_lr: float = Field(0.005, gt=0, description="stage 1 (KL to uniform on D_f) learning rate, "
                              "weight decay 0")
    uniform_epochs: int = Field(1, ge=0, description="stage 1 passes over D_f")
    contrastive_lr: float = Field(3e-4, gt=0, description="contrastive round learning rate, cosine-annealed per "
                                  "step to min_lr over the run, weight decay 0")
    min_lr: float = Field(1e-6, ge=0, description="final learning rate of the contrastive round's cosine schedule")
    temperature: float = Field(1.15, gt=0, description="tau dividing the logit dot products")


def uniform_kl(logits: torch.Tensor) -> torch.Tensor:
    """KL(U || softmax(logits)), batch mean: KLDivLoss(batchmean)(log_softmax(logits), uniform)."""
    c = logits.shape[1]
    return F.kl_div(F.log_softmax(logits, dim=1), torch.full_like(logits, 1.0 / c), reduction="batchmean")


def contrastive_uniform_loss(forget_logits: torch.Tensor, retain_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """-mean_{i,t} log softmax_t(z_f,i . z_r,t / tau): each forget sample's similarity distribution over the
    retain batch against a uniform target. The retain logits are detached (only D_f moves)."""
    sim = forget_logits @ retain_logits.detach().T / tau
    return -F.log_softmax(sim, dim=1).mean()


@register("contrastive_unlearn", ContrastiveParams, source="seed 003 §6.1.2; NeurIPS'23 2nd place (Fanchuan)")
def contrastive_unlearn(model: nn.Module, forget: Split, retain: Split, p: ContrastiveParams,
                        ctx: UnlearnContext) -> nn.Module:
    """KL to uniform on D_f, then epochs of (logit-similarity contrastive round on D_f, CE round on D_r)."""
    gen = ctx.generator()
    device = retain.x.device
    losses = ctx.stats["loss"]
    uniform_losses = ctx.stats.setdefault("uniform_loss", [])
    contrastive_losses = ctx.stats.setdefault("contrastive_loss", [])
    # three optimizers over the same parameters, as in the reference (each stage its own settings)
    opt_uniform = sgd(model, p.uniform_lr, p.momentum, 0.0)
    opt_contrast = sgd(model, p.contrastive_lr, p.momentum, 0.0)
    opt_retain = sgd(model, p.lr, p.momentum, p.weight_decay)
    steps = p.epochs * min(batches_per_epoch(len(forget), p.batch_size),
                           batches_per_epoch(retain_count(len(retain), p), p.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_contrast, T_max=max(steps, 1), eta_min=p.min_lr)

    for epoch in range(p.uniform_epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in minibatches(len(forget), p.batch_size, gen, device):
            loss = uniform_kl(model(forget.x[idx]))
            opt_uniform.zero_grad(set_to_none=True)
            loss.backward()
            opt_uniform.step()
            loss_sum += loss.detach()
            batches += 1
        uniform_losses.append(check_loss(loss_sum, batches, "contrastive_unlearn (uniform stage)", epoch))

    for epoch in range(p.epochs):
        model.train()
        # contrastive round: zip(D_f, a freshly shuffled D_r) stops at the shorter
        loss_sum, batches = torch.zeros((), device=device), 0
        for fidx, ridx in zip(minibatches(len(forget), p.batch_size, gen, device),
                              epoch_batches(len(retain), p, gen, device)):
            with torch.no_grad():
                retain_logits = model(retain.x[ridx])
            loss = contrastive_uniform_loss(model(forget.x[fidx]), retain_logits, p.temperature)
            opt_contrast.zero_grad(set_to_none=True)
            loss.backward()
            opt_contrast.step()
            sched.step()
            loss_sum += loss.detach()
            batches += 1
        contrastive_losses.append(check_loss(loss_sum, batches, "contrastive_unlearn (contrastive round)", epoch))
        # retain round: a full pass over D_r with cross-entropy
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in epoch_batches(len(retain), p, gen, device):
            loss = F.cross_entropy(model(retain.x[idx]), retain.y[idx])
            opt_retain.zero_grad(set_to_none=True)
            loss.backward()
            opt_retain.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, "contrastive_unlearn (retain round)", epoch))
    return model
