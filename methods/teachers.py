"""Teachers for distillation-based unlearning (SCRUB, Bad Teaching and its variants): frozen copies, seeded
random-init teachers carried as a Preparation, and the KL losses between a student and its teachers.

Import these from here (`rumflow.methods.teachers`); they have no registry side effects."""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rumflow.methods.registry import UnlearnContext

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
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), target, reduction=reduction)


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
