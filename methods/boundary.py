"""Boundary Shrink (Chen et al., CVPR 2023): each forget example is pushed across its nearest decision boundary
by FGSM on the frozen original model, and the model is fine-tuned to predict that neighbouring class."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.registry import MethodParams, Preparation, UnlearnContext, register
from rumflow.training import check_loss, minibatches, sgd

CHUNK = 512  # examples per FGSM forward pass: bounds memory only, so it is not a hyperparameter


class BoundaryShrinkParams(MethodParams):
    lr: float = Field(1e-5, gt=0, description="learning rate (constant; the authors' value)")
    epochs: int = Field(10, ge=0, description="passes over D_f")
    bound: float = Field(0.1, gt=0, description="FGSM step: x + bound * sign(grad_x CE), on raw inputs in [0, 1]")
    discretize: bool = Field(True, description="round the perturbed image to 1/255 steps (an 8-bit image), as "
                             "the authors do")


def fgsm_neighbours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bound: float,
                    discretize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, argmax model(x_adv)): x_adv = clamp(x + bound * sign(grad_x CE(model(x), y)), 0, 1),
    optionally rounded to 1/255; `model` is used as it is (call it in eval mode), its weights get no grad."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")  # sum: each example's gradient is its own
        (grad,) = torch.autograd.grad(loss, [x])
    x_adv = (x.detach() + bound * grad.sign()).clamp_(0, 1)
    if discretize:
        x_adv = torch.round(x_adv * 255) / 255
    with torch.no_grad():
        return x_adv, model(x_adv).argmax(1)


def _prepare_boundary(model: nn.Module, forget: Split, retain: Split, p: BoundaryShrinkParams,
                      ctx: UnlearnContext) -> dict[str, torch.Tensor]:
    """The neighbour label of every forget example under the original (starting) model, in eval mode."""
    model.eval()
    labels = [fgsm_neighbours(model, forget.x[idx], forget.y[idx], p.bound, p.discretize)[1]
              for idx in minibatches(len(forget), CHUNK, torch.Generator(), forget.x.device, shuffle=False)]
    return {"neighbour_labels": torch.cat(labels) if labels else forget.y[:0]}


@register("boundary_shrink", BoundaryShrinkParams, source="Chen et al. CVPR 2023; seed 004 baseline",
          prepare=Preparation(_prepare_boundary, params=("bound", "discretize")))
def boundary_shrink(model: nn.Module, forget: Split, retain: Split, p: BoundaryShrinkParams,
                    ctx: UnlearnContext) -> nn.Module:
    """CE of each forget example towards the class FGSM on the frozen original reaches (its neighbour class).

    The neighbour labels are the preparation (fixed for the whole run, as the original model is frozen)."""
    prepared = ctx.prepared or {}
    target = prepared.get("neighbour_labels")
    if target is None or tuple(target.shape) != (len(forget),):
        raise ValueError("the prepared neighbour labels do not match this forget set; compute them with "
                         "the boundary_shrink preparation on the model being unlearned.")
    gen = ctx.generator()
    device = forget.x.device
    target = target.to(device)
    opt = sgd(model, p.lr, p.momentum, p.weight_decay)
    ctx.stats["label_changed"] = float((target != forget.y).float().mean())
    losses = ctx.stats["loss"]
    for epoch in range(p.epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in minibatches(len(forget), p.batch_size, gen, device):
            loss = F.cross_entropy(model(forget.x[idx]), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, "boundary_shrink", epoch))
    return model
