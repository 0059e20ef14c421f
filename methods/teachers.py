"""Teachers for distillation-based unlearning (SCRUB, Bad Teaching and its variants): frozen copies, seeded
random-init teachers carried as a Preparation, the KL losses between a student and its teachers, and
Bad Teaching itself (Chundawat et al. 2023; seed 001 §6.5, seed 003 §4.3).

Variants import the helpers from here (`rumflow.methods.teachers`)."""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.common import mixed_batches
from rumflow.methods.parts import OptimizerName, build_optimizer
from rumflow.methods.registry import (MethodParams, Preparation, UnlearnContext, register, register_preset,
                                      retain_count)
from rumflow.training import check_loss

KLReduction = Literal["batchmean", "mean"]

# Key prefix of a random-init teacher's state in a method's prepared tensors.
RANDOM_TEACHER = "random_teacher."


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode with gradients off: a teacher that never changes."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher_T || student_T), batch mean, times T^2 (Hinton et al.'s distillation loss; SCRUB's DistillKL)."""
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * t * t


def kl_to_probs(student_logits: torch.Tensor, target: torch.Tensor, t: float = 1.0,
                reduction: KLReduction = "batchmean") -> torch.Tensor:
    """KL(target || softmax(student / t)) for target probabilities; `batchmean` is the true KL averaged over
    the batch, `mean` (the Bad Teaching code's default) divides it further by the number of classes."""
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), target, reduction="batchmean")
    return kl if reduction == "batchmean" else kl / student_logits.shape[1]  # torch's "mean" is being retired


def teacher_targets(good_logits: torch.Tensor, bad_logits: torch.Tensor, is_forget: torch.Tensor,
                    t: float = 1.0) -> torch.Tensor:
    """Per example, the incompetent teacher's softmax(bad / t) where `is_forget`, else the competent one's."""
    return torch.where(is_forget[:, None], F.softmax(bad_logits / t, dim=1), F.softmax(good_logits / t, dim=1))


def bad_teacher_loss(student_logits: torch.Tensor, good_logits: torch.Tensor, bad_logits: torch.Tensor,
                     is_forget: torch.Tensor, t: float = 1.0, reduction: KLReduction = "batchmean") -> torch.Tensor:
    """Bad Teaching's loss (Chundawat et al. 2023, 003 eq. (5)): (1 - l_u) KL(T_s || S) + l_u KL(T_d || S)."""
    return kl_to_probs(student_logits, teacher_targets(good_logits, bad_logits, is_forget, t), t, reduction)


def random_teacher_state(ctx: UnlearnContext, prefix: str = RANDOM_TEACHER) -> dict[str, torch.Tensor]:
    """The state of a randomly initialised teacher, `ctx.fresh_model()` (seeded by the context), keys prefixed:
    a Preparation's result (register it with uses_seed=True)."""
    fresh = ctx.fresh_model()
    return {prefix + k: v.detach().clone() for k, v in fresh.state_dict().items()}


def load_teacher(ctx: UnlearnContext, prepared: dict[str, torch.Tensor] | None, device: torch.device,
                 prefix: str = RANDOM_TEACHER) -> nn.Module:
    """The frozen teacher whose state `random_teacher_state` put in `prepared` under `prefix`."""
    teacher = ctx.fresh_model()
    state = {k[len(prefix):]: v for k, v in (prepared or {}).items() if k.startswith(prefix)}
    if set(state) != set(teacher.state_dict()):
        raise ValueError(f"the prepared tensors hold no teacher state under '{prefix}' matching this model; "
                         "compute them with random_teacher_state() for the same architecture.")
    teacher.load_state_dict(state)
    return teacher.to(device).eval().requires_grad_(False)


def retain_subset(n_retain: int, n_forget: int, p: MethodParams, scale: float | None,
                  gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Positions of a seeded random subset of D_r, drawn once: round(scale * n_forget) examples when `scale`
    is set (003's retain_scale), else the `retain_fraction` share of D_r; at most all of D_r."""
    keep = retain_count(n_retain, p) if scale is None else min(n_retain, max(1, round(scale * n_forget)))
    return torch.randperm(n_retain, generator=gen)[:keep].to(device)


class BadTeachingParams(MethodParams):
    optimizer: OptimizerName = Field("adam", description="sgd (with momentum), adam or adamw (the reference: adam)")
    lr: float = Field(1e-4, gt=0, description="learning rate (constant)")
    epochs: int = Field(1, ge=0, description="passes over D_f plus the retain subset")
    weight_decay: float = Field(0.0, ge=0, description="weight decay (the reference: none; 003: 5e-3)")
    retain_fraction: float = Field(0.3, gt=0, le=1, description="the retain subset: a seeded random fraction of "
                                   "D_r drawn once and mixed with all of D_f (the reference: 0.3); it also bounds "
                                   "the compute")
    retain_scale: float | None = Field(None, gt=0, description="when set, the retain subset holds "
                                       "round(retain_scale x |D_f|) examples instead (003's retain_scale)")
    temperature: float = Field(1.0, gt=0, description="temperature of the student's and both teachers' softmax")
    kl_reduction: KLReduction = Field("batchmean", description="batchmean: the true KL averaged over the batch; "
                                      "mean: also divided by the number of classes (the reference's kl_div default)")
    ce_weight: float = Field(0.0, ge=0, description="optional extra CE on the batch's retain examples "
                             "(the reference uses the KL only)")


def _prepare_bad_teacher(model: nn.Module, forget: Split, retain: Split, p: BadTeachingParams,
                         ctx: UnlearnContext) -> dict[str, torch.Tensor]:
    """The incompetent teacher: a seeded random initialisation of the architecture (its state)."""
    return random_teacher_state(ctx)


@register("bad_teaching", BadTeachingParams,
          source="seed 001 §6.5 Alg. 5; seed 003 §4.3; Chundawat et al. 2023 (vikram2000b/bad-teaching-unlearning)",
          prepare=Preparation(_prepare_bad_teacher, uses_seed=True))
def bad_teaching(model: nn.Module, forget: Split, retain: Split, p: BadTeachingParams,
                 ctx: UnlearnContext) -> nn.Module:
    """Bad Teaching: the student follows a random-init teacher on D_f and the starting model on a retain subset.

    Loss: KL(teacher_T || student_T), the teacher being, per example, the incompetent one (ctx.prepared,
    a seeded ctx.fresh_model()) on D_f and the competent one (a frozen copy of the step's starting model)
    on the retain subset; batches mix the two sets."""
    gen = ctx.generator()
    device = retain.x.device
    good = frozen_copy(model)
    bad = load_teacher(ctx, ctx.prepared, device)
    subset = retain_subset(len(retain), len(forget), p, p.retain_scale, gen, device)
    opt = build_optimizer(model, p.optimizer, p.lr, p.momentum, p.weight_decay)
    losses = ctx.stats["loss"]
    ctx.stats["retain_subset"] = len(subset)
    for epoch in range(p.epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        for fidx, ridx in mixed_batches(len(forget), len(subset), p.batch_size, gen, device):
            ridx = subset[ridx]
            x = torch.cat([forget.x[fidx], retain.x[ridx]])
            is_forget = torch.arange(x.shape[0], device=device) < fidx.shape[0]
            with torch.no_grad():
                good_logits, bad_logits = good(x), bad(x)
            logits = model(x)
            loss = bad_teacher_loss(logits, good_logits, bad_logits, is_forget, p.temperature, p.kl_reduction)
            if p.ce_weight > 0 and ridx.shape[0] > 0:
                loss = loss + p.ce_weight * F.cross_entropy(logits[fidx.shape[0]:], retain.y[ridx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, "bad_teaching", epoch))
    return model


register_preset("bad_teaching_retain_subset", "bad_teaching", "seed 003 §4.3 ('Naive Teachers')",
                "Seed 003's Bad Teaching: a retain subset of 3 x |D_f|, 5 epochs, Adam 1e-4 with weight decay 5e-3.",
                retain_scale=3.0, epochs=5, weight_decay=5e-3)
