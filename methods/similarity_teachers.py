"""Bad Teaching with similarity sampling (seed 003 §6.1.1; 12th place in the NeurIPS 2023 challenge).

No reference code exists; the document describes four changes to Bad Teaching in prose. This is the
project's reading (docs/methods.md, "Seed 003"):
- the retain examples are the union of each forget image's k nearest retain images by cosine similarity
  of the original model's penultimate features (the input of its final nn.Linear), capped at
  `retain_budget` x |D_f|, ranked by how many forget images chose them, then by their best similarity;
- each chosen retain example is weighted by that count, normalised to mean 1 (`weighted`);
- the bad teacher is a fresh model pre-trained on D_r for `bad_teacher_epochs` with the original recipe's
  optimiser settings (or, as an option, left at random init);
- batches alternate one forget batch (distilled from the bad teacher) and one retain batch (from the
  competent teacher, the frozen original), the longer set's remaining batches last.
The subset, its weights and the bad teacher are the method's Preparation.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.methods.parts import OptimizerName, build_optimizer, capture_penultimate
from rumflow.methods.registry import MethodParams, Preparation, UnlearnContext, epoch_batches, register
from rumflow.methods.ssd import prefixed
from rumflow.methods.teachers import frozen_copy, kl_to_probs, load_teacher
from rumflow.training import Recipe, check_loss, minibatches, train_model

BAD_TEACHER = "bad_teacher."


class SimilarityTeachingParams(MethodParams):
    lr: float = Field(1e-4, gt=0, description="learning rate (Bad Teaching's Adam 1e-4)")
    epochs: int = Field(1, ge=0, description="passes over D_f and the chosen retain subset, batches alternating")
    optimizer: OptimizerName = Field("adam", description="adam (Bad Teaching's; momentum unused), adamw or sgd")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both teachers and the student")
    k: int = Field(3, ge=1, description="nearest retain images per forget image (cosine, penultimate features)")
    retain_budget: float = Field(3.0, gt=0, description="at most this many retain examples per forget example "
                                 "(seed 003's retain_scale 3)")
    weighted: bool = Field(True, description="weight each chosen retain example's KL by how many forget "
                           "images chose it (normalised to mean 1)")
    bad_teacher: Literal["retain_pretrained", "random"] = Field(
        "retain_pretrained", description="retain_pretrained: a fresh model trained on D_r for bad_teacher_epochs "
        "(seed 003); random: Bad Teaching's random init")
    bad_teacher_epochs: int = Field(1, ge=0, description="epochs of the bad teacher's pre-training on D_r with "
                                    "the original recipe's optimiser settings (the document leaves it open; "
                                    "0 leaves it at random init)")


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Eval-mode inputs of the model's final nn.Linear for `x`, L2-normalised (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with capture_penultimate(model) as seen:
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size])
    finally:
        model.train(was_training)
    if not seen:
        return torch.zeros(0, 0, device=x.device)
    return F.normalize(torch.cat([f.flatten(1) for f in seen]), dim=1)


def similarity_subset(forget_feats: torch.Tensor, retain_feats: torch.Tensor, k: int, budget: int,
                      chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in D_r of the chosen retain examples and their votes (how many forget examples have each
    among their k most cosine-similar retain examples); the union, capped at `budget`, ranked by votes then
    by best similarity. Features must be L2-normalised. Sorted by position."""
    n = retain_feats.shape[0]
    k = min(k, n)
    device = retain_feats.device
    if k == 0 or forget_feats.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device)
    votes = torch.zeros(n, device=device)
    best = torch.full((n,), -2.0, device=device)  # below any cosine
    for i in range(0, forget_feats.shape[0], chunk):  # bounds the |D_f| x |D_r| similarity matrix
        sim, idx = (forget_feats[i:i + chunk] @ retain_feats.T).topk(k, dim=1)
        votes.index_add_(0, idx.flatten(), torch.ones(idx.numel(), device=device))
        best.scatter_reduce_(0, idx.flatten(), sim.flatten(), reduce="amax")
    order = torch.sort(best, descending=True, stable=True).indices  # ties in votes: the more similar first
    order = order[torch.sort(votes[order], descending=True, stable=True).indices]
    keep = min(int((votes > 0).sum()), budget)
    chosen = order[:keep].sort().values
    return chosen, votes[chosen]


def alternation(n_forget: int, n_retain: int) -> list[tuple[bool, int]]:
    """One epoch's batch order: (is_forget, batch index), alternating forget and retain batches, then the rest
    of the longer list (seed 003's "smart batch construction")."""
    order: list[tuple[bool, int]] = []
    for i in range(max(n_forget, n_retain)):
        if i < n_forget:
            order.append((True, i))
        if i < n_retain:
            order.append((False, i))
    return order


def _bad_teacher_state(model: nn.Module, retain: Split, p: SimilarityTeachingParams,
                       ctx: UnlearnContext) -> dict[str, torch.Tensor]:
    """A seeded fresh model, pre-trained on D_r for bad_teacher_epochs (or left at random init)."""
    teacher = ctx.fresh_model().to(retain.x.device)
    if p.bad_teacher == "retain_pretrained" and len(retain) > 0:
        r = ctx.recipe
        recipe = Recipe(p.bad_teacher_epochs, r.lr, r.batch_size, r.momentum, r.weight_decay, r.cosine)
        train_model(teacher, retain, recipe, seed=ctx.seed, augment=ctx.augment)
    return prefixed(BAD_TEACHER, {k: v.detach().clone() for k, v in teacher.state_dict().items()})


def _prepare(model: nn.Module, forget: Split, retain: Split, p: SimilarityTeachingParams,
             ctx: UnlearnContext) -> dict[str, torch.Tensor]:
    """The similarity-chosen retain subset (ids and votes) and the bad teacher's state."""
    pos, votes = similarity_subset(penultimate_features(model, forget.x), penultimate_features(model, retain.x),
                                   p.k, max(1, round(p.retain_budget * len(forget))))
    out = {"subset_ids": retain.example_id[pos], "subset_votes": votes}
    out.update(_bad_teacher_state(model, retain, p, ctx))
    return out


def weighted_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                t: float) -> torch.Tensor:
    """mean_i w_i KL(softmax(teacher_i / t) || softmax(student_i / t)) (per-example true KL, weighted)."""
    per = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                   reduction="none").sum(1)
    return (per * weights).mean()


@register("bad_teaching_similarity", SimilarityTeachingParams,
          source="seed 003 §6.1.1 (Kaggle 458648; no reference code)",
          prepare=Preparation(_prepare, params=("k", "retain_budget", "bad_teacher", "bad_teacher_epochs"),
                              uses_retain=True, uses_seed=True))
def bad_teaching_similarity(model: nn.Module, forget: Split, retain: Split, p: SimilarityTeachingParams,
                            ctx: UnlearnContext) -> nn.Module:
    """Bad Teaching on D_f and the retain images most similar to it, weighted, batches alternating."""
    prepared = ctx.prepared or {}
    if "subset_ids" not in prepared or "subset_votes" not in prepared:
        raise ValueError("the prepared tensors hold no similarity subset; compute them with the method's "
                         "preparation on the model being unlearned.")
    device = retain.x.device
    bad = load_teacher(ctx, prepared, device, prefix=BAD_TEACHER)
    good = frozen_copy(model)
    subset = retain.positions(prepared["subset_ids"].cpu()).to(device)
    votes = prepared["subset_votes"].to(device)
    weights = votes / votes.mean() if p.weighted and len(votes) else torch.ones_like(votes)
    ctx.stats["subset_size"] = len(subset)
    opt = build_optimizer(model, p.optimizer, p.lr, p.momentum, p.weight_decay)
    gen = ctx.generator()
    losses = ctx.stats["loss"]
    for epoch in range(p.epochs):
        model.train()
        forget_batches = list(minibatches(len(forget), p.batch_size, gen, device))
        retain_batches = list(epoch_batches(len(subset), p, gen, device)) if len(subset) else []
        loss_sum, batches = torch.zeros((), device=device), 0
        for is_forget, i in alternation(len(forget_batches), len(retain_batches)):
            if is_forget:  # destructive: follow the incompetent teacher on D_f
                xb = forget.x[forget_batches[i]]
                with torch.no_grad():
                    target = F.softmax(bad(xb) / p.temperature, dim=1)
                loss = kl_to_probs(model(xb), target, p.temperature)
            else:  # reconstructive: follow the competent teacher on the similar retain images
                sel = retain_batches[i]
                xb = retain.x[subset[sel]]
                with torch.no_grad():
                    t_logits = good(xb)
                loss = weighted_kl(model(xb), t_logits, weights[sel], p.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        losses.append(check_loss(loss_sum, batches, "bad_teaching_similarity", epoch))
    return model
