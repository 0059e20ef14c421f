"""Methods that train only some blocks: CF-k (fine-tune the last k blocks), selective fine-tuning (seed 000
Alg. 2, a preset of CF-k) and EU-k (re-initialise the last k blocks, then retrain them), and the
trainable-set machinery other methods share (`TrainableSet`, `choose_blocks`, `Freeze`).

Blocks are the model registry's ordered blocks (`rumflow.models.blocks`): small_cnn block1..block3, head;
resnet18 stem, layer1..layer4, fc; vgg16_bn block1..block5, head.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from rumflow.data import Split
from rumflow.errors import ConfigError
from rumflow.methods.basic import FinetuneParams, finetune_loop
from rumflow.methods.registry import Hyperparameters, UnlearnContext, register, register_preset
from rumflow.models import blocks

Blocks = list[tuple[str, nn.Module]]


class TrainableSet(Hyperparameters):
    """Which blocks a method may change: named ones, or the last k (the rest stay bit-identical)."""

    trainable: tuple[str, ...] | None = Field(None, description="names of the blocks to train (e.g. "
                                              "[layer4, fc] on resnet18); wins over last_k; none = use last_k")
    last_k: int | None = Field(None, ge=1, description="train only the last k blocks, the head counted "
                               "(none with no trainable = every parameter)")
    frozen_bn: Literal["eval", "train"] = Field("eval", description="frozen blocks during training: eval "
                                                "keeps them bit-identical (their BatchNorm uses and keeps its "
                                                "running statistics); train lets those statistics move, as "
                                                "the seeds' code does")


def choose_blocks(model: nn.Module, trainable: tuple[str, ...] | None, last_k: int | None) -> Blocks | None:
    """The blocks to train, in model order; None means every parameter (no block list needed)."""
    if trainable is None and last_k is None:
        return None
    listed = blocks(model)
    names = [n for n, _ in listed]
    if trainable is not None:
        unknown = [t for t in trainable if t not in names]
        if unknown or not trainable:
            raise ConfigError(f"model {model.arch} has no block {', '.join(unknown) or '(empty list)'}; "
                              f"its blocks are: {', '.join(names)}; fix 'trainable' in the config.")
        return [(n, m) for n, m in listed if n in trainable]
    if last_k > len(listed):
        raise ConfigError(f"last_k {last_k} is more than the {len(listed)} blocks of model {model.arch} "
                          f"({', '.join(names)}); lower last_k.")
    return listed[-last_k:]


class Freeze:
    """Trains only the chosen blocks for the length of a `with` block, then restores every parameter's
    requires_grad (a freeze never leaks into later methods, unlike seed 000's notebook)."""

    def __init__(self, model: nn.Module, chosen: Blocks | None, frozen_bn: str = "eval"):
        self.model = model
        self.frozen_bn = frozen_bn
        self.saved = [(q, q.requires_grad) for q in model.parameters()]
        self.frozen: Blocks = []
        if chosen is not None:
            keep = {n for n, _ in chosen}
            self.frozen = [(n, m) for n, m in blocks(model) if n not in keep]
        self._apply()

    def _apply(self) -> None:
        """requires_grad off for the frozen blocks (also spares their weight gradients)."""
        for _, block in self.frozen:
            for q in block.parameters():
                q.requires_grad_(False)

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters being trained (build the optimizer over exactly these)."""
        return [q for q in self.model.parameters() if q.requires_grad]

    def train(self) -> None:
        """Train mode for an update phase; frozen blocks stay in eval mode when frozen_bn is 'eval'."""
        self.model.train()
        if self.frozen_bn == "eval":
            for _, block in self.frozen:
                block.eval()

    def unfreeze(self, names: tuple[str, ...], opt: torch.optim.Optimizer) -> list[str]:
        """Make frozen blocks `names` trainable and add them to `opt` as a new parameter group (seed 000's
        Hybrid Models 3/4 set requires_grad after building the optimizer, which never steps them)."""
        opened = [(n, m) for n, m in self.frozen if n in names]
        self.frozen = [(n, m) for n, m in self.frozen if n not in names]
        new = []
        for _, block in opened:
            for q in block.parameters():
                q.requires_grad_(True)
                new.append(q)
        if new:
            opt.add_param_group({"params": new})
        return [n for n, _ in opened]

    def close(self) -> None:
        """Put every parameter's requires_grad back as it was."""
        for q, flag in self.saved:
            q.requires_grad_(flag)

    def __enter__(self) -> "Freeze":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CfkParams(FinetuneParams, TrainableSet):
    """CF-k: 001's benchmark CF-3 (plain SGD lr 0.001, 2 epochs, batch 64, the last 3 blocks)."""

    lr: float = Field(0.001, gt=0, description="learning rate")
    epochs: int = Field(2, ge=0, description="passes over the retain set")
    batch_size: int = Field(64, ge=2, description="mini-batch size")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="weight decay")
    last_k: int | None = Field(3, ge=1, description="train only the last k blocks, the head counted "
                               "(3 on resnet18 = layer3, layer4, fc: the benchmark's CF-3)")


@register("cf_k", CfkParams, source="seed 001 §6.1 Alg. 1 (Goel et al. 2022; benchmark CF-3)")
def cf_k(model: nn.Module, forget: Split, retain: Split, p: CfkParams, ctx: UnlearnContext) -> nn.Module:
    """Fine-tune only the last k blocks (or the named ones) on the retain set with CE; the rest stay fixed."""
    return finetune_loop(model, retain, p, ctx, "cf_k", choose_blocks(model, p.trainable, p.last_k))


register_preset("selective_finetune", "cf_k", "seed 000 Alg. 2",
                "Fine-tune only the last two blocks (layer4 and fc on resnet18) on the retain set, cosine lr.",
                last_k=2, lr=0.001, momentum=0.9, weight_decay=5e-4, epochs=100, batch_size=128,
                schedule="cosine")


class EukParams(CfkParams):
    """EU-k: 001 Alg. 6 (SGD lr 0.01, 2 epochs, train mode), the last 3 blocks re-initialised."""

    lr: float = Field(0.01, gt=0, description="learning rate")
    last_k: int | None = Field(3, ge=1, description="re-initialise and retrain the last k blocks, the head "
                               "counted")


def reinitialise(chosen: Blocks, fresh: nn.Module) -> None:
    """Copy parameters and buffers of the chosen blocks from the same-named blocks of `fresh`."""
    fresh_blocks = dict(blocks(fresh))
    with torch.no_grad():
        for name, block in chosen:
            block.load_state_dict(fresh_blocks[name].state_dict())


@register("eu_k", EukParams, source="seed 001 §6.6 Alg. 6 (Goel et al. 2022)")
def eu_k(model: nn.Module, forget: Split, retain: Split, p: EukParams, ctx: UnlearnContext) -> nn.Module:
    """Re-initialise the last k blocks (parameters and buffers, a seeded fresh init), then retrain them on D_r."""
    chosen = choose_blocks(model, p.trainable, p.last_k)
    if chosen is None:  # every parameter: exact unlearning is retraining from scratch
        chosen = blocks(model)
    reinitialise(chosen, ctx.fresh_model())
    return finetune_loop(model, retain, p, ctx, "eu_k", chosen)
