"""The unlearning-method registry: a name, typed hyperparameters, one function, an optional preparation.

`run_method` owns the envelope every method shares (the empty-forget guard, the loss record, the
example count, the preparation, the final finiteness check), so a method's function is only its loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from torch import nn

from rumflow.data import Split
from rumflow.errors import ConfigError
from rumflow.methods.common import ensure_finite
from rumflow.registry import Registry
from rumflow.training import Recipe, memory_format, minibatches


class Hyperparameters(BaseModel):
    """Base of every method's hyperparameters: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Hyperparameters):
    """For methods that take no hyperparameters."""


class MethodParams(Hyperparameters):
    """Hyperparameters every SGD-based method shares (RUM's common machinery) and the compute budget."""

    lr: float = Field(0.01, gt=0, description="learning rate (constant)")
    epochs: int = Field(10, ge=0, description="passes over the method's driving data")
    batch_size: int = Field(256, ge=2, description="mini-batch size")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="SGD weight decay")
    retain_fraction: float = Field(1.0, gt=0, le=1, description="compute budget: each epoch visits this "
                                   "fraction of D_r, a fresh sample drawn with the method's seed (1 = all of it)")


@dataclass
class UnlearnContext:
    """What a method may need besides the data: its seed, the original recipe, a fresh-model factory."""

    seed: int
    recipe: Recipe
    fresh_model: Callable[[], nn.Module]
    augment: bool = False
    # What the method's preparation computed (masks, importances, teachers), when the caller cached it;
    # run_method computes it when it is None.
    prepared: dict[str, torch.Tensor] | None = None
    # Validation data for methods that select on it (never the test or forget sets).
    val: Split | None = None
    # Written by the method and the envelope, read by the caller: "loss" (per-epoch mean losses),
    # "examples" (examples forwarded through the model), "prepare_seconds", method-specific diagnostics.
    stats: dict[str, Any] = field(default_factory=dict)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh CPU generator seeded from the context (same seed, same draws); `offset` gives others."""
        return torch.Generator().manual_seed(self.seed + offset)


MethodFn = Callable[[nn.Module, Split, Split, Any, UnlearnContext], nn.Module]
PrepareFn = Callable[[nn.Module, Split, Split, Any, UnlearnContext], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Preparation:
    """Work a method does before it runs, cached by the caller as its own task.

    The cache key covers only what the result depends on: the parent model, the forget set, the retain
    set when `uses_retain`, the hyperparameters named in `params`, and the seed when `uses_seed`."""

    fn: PrepareFn
    params: tuple[str, ...] = ()
    uses_retain: bool = False
    uses_seed: bool = False


@dataclass(frozen=True)
class Method:
    """A registered unlearning algorithm."""

    name: str
    params: type[Hyperparameters]
    fn: MethodFn
    summary: str
    source: str = ""  # the document (and section) the algorithm comes from
    prepare: Preparation | None = None
    preset_of: str | None = None
    needs_forget: bool = True  # with an empty forget set the model is returned unchanged


METHODS: Registry[Method] = Registry("method", " (`rumflow methods` lists them with their hyperparameters)")


def register(name: str, params: type[Hyperparameters] = MethodParams, source: str = "SPEC",
             prepare: Preparation | None = None, needs_forget: bool = True) -> Callable[[MethodFn], MethodFn]:
    """Register `fn(model, forget, retain, params, ctx) -> model` under `name`."""

    def wrap(fn: MethodFn) -> MethodFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        METHODS.add(name, Method(name, params, fn, doc[0] if doc else "", source, prepare,
                                 needs_forget=needs_forget))
        return fn

    return wrap


def register_preset(name: str, base: str, source: str, summary: str, **defaults: Any) -> Method:
    """Register `name` as method `base` with other default hyperparameters (same function, same contract)."""
    parent = METHODS.get(base)
    fields = parent.params.model_fields
    unknown = set(defaults) - set(fields)
    if unknown:
        raise ValueError(f"preset {name}: {base} has no hyperparameter {sorted(unknown)}")
    overrides = {}
    for key, value in defaults.items():
        info = fields[key]
        new = Field(value, description=info.description)
        new.metadata = list(info.metadata)
        overrides[key] = (info.annotation, new)
    params = create_model(f"{''.join(w.title() for w in name.split('_'))}Params", __base__=parent.params,
                          __doc__=summary, **overrides)
    method = Method(name, params, parent.fn, summary, source, parent.prepare, preset_of=base,
                    needs_forget=parent.needs_forget)
    return METHODS.add(name, method)


def dataset_settings(dataset: str = "digits") -> dict[str, dict[str, Any]]:
    """Hyperparameters that work on a data set (methods/<dataset>.yaml): table rows and experiment tiers."""
    import yaml
    from pathlib import Path

    path = Path(__file__).with_name(f"{dataset}.yaml")
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def get_method(name: str) -> Method:
    """The method registered as `name`, or a ConfigError listing the choices."""
    return METHODS.get(name)


def validate_params(name: str, params: dict[str, Any] | BaseModel) -> Hyperparameters:
    """Validate `params` for method `name`; one sentence on the first problem."""
    method = get_method(name)
    if isinstance(params, method.params):
        return params
    if isinstance(params, BaseModel):
        params = params.model_dump()
    try:
        return method.params.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(params)"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(method.params.model_fields) or "none"
            raise ConfigError(f"method '{name}' has no hyperparameter '{key}'; its hyperparameters are: "
                              f"{allowed}.") from None
        raise ConfigError(f"method '{name}': hyperparameter '{key}' {err['msg'].lower()} "
                          f"(got {err.get('input')!r}); fix it in the config.") from None


def epoch_batches(n: int, p: Any, gen: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """One epoch's mini-batches over n examples of D_r within the budget: a seeded sample of
    `retain_fraction` of them (all when the method has no budget), shuffled."""
    keep = retain_count(n, p)
    if keep == n:
        yield from minibatches(n, p.batch_size, gen, device)
        return
    chosen = torch.randperm(n, generator=gen)[:keep].to(device)
    for idx in minibatches(keep, p.batch_size, gen, device):
        yield chosen[idx]


def retain_count(n: int, p: Any) -> int:
    """How many of n retain examples one epoch visits under the budget `p.retain_fraction`."""
    fraction = getattr(p, "retain_fraction", 1.0)
    return n if fraction >= 1.0 or n < 2 else max(2, round(fraction * n))


def retain_sample(n: int, p: Any, gen: torch.Generator) -> torch.Tensor | None:
    """Positions (CPU) of this epoch's budgeted sample of n retain examples; None when it is all of them."""
    keep = retain_count(n, p)
    return None if keep == n else torch.randperm(n, generator=gen)[:keep]


def prepare_method(name: str, params: dict[str, Any] | BaseModel, model: nn.Module, forget: Split, retain: Split,
                   ctx: UnlearnContext) -> dict[str, torch.Tensor]:
    """Run method `name`'s preparation on `model` (its weights and mode are left as they were)."""
    method = get_method(name)
    if method.prepare is None:
        return {}
    p = validate_params(name, params)
    was_training = model.training
    try:
        with memory_format(model, _channels_last(model, ctx)):
            return method.prepare.fn(model, forget, retain, p, ctx)
    finally:
        model.train(was_training)


def _channels_last(model: nn.Module, ctx: UnlearnContext) -> bool:
    """Whether the recipe's layout switch puts this model's convolutions in NHWC on its device."""
    first = next(model.parameters(), None)
    return first is not None and ctx.recipe.fast.use_channels_last(first.device)


def _count_examples(ctx: UnlearnContext) -> Callable[..., None]:
    """A forward pre-hook adding each batch's size to ctx.stats['examples'] (a shape read, no sync)."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and torch.is_grad_enabled():
            ctx.stats["examples"] = ctx.stats.get("examples", 0) + int(args[0].shape[0])

    return hook


def run_method(name: str, params: dict[str, Any] | BaseModel, model: nn.Module, forget: Split,
               retain: Split, ctx: UnlearnContext) -> nn.Module:
    """Validate the hyperparameters and apply method `name`; returns the unlearned model.

    The envelope: an empty forget set returns the model unchanged (for methods that need one);
    the preparation runs here unless the caller passed its cached result in `ctx.prepared` (its
    seconds land in ctx.stats['prepare_seconds']); every gradient-enabled forward pass of the model
    counts its batch in ctx.stats['examples']; a result with non-finite weights raises DivergenceError;
    the model comes back in eval mode."""
    method = get_method(name)
    p = validate_params(name, params)
    ctx.stats.setdefault("loss", [])
    ctx.stats.setdefault("examples", 0)
    if method.needs_forget and len(forget) == 0:
        return model.eval()
    if method.prepare is not None and ctx.prepared is None:
        start = time.perf_counter()
        ctx.prepared = prepare_method(name, p, model, forget, retain, ctx)
        ctx.stats["prepare_seconds"] = time.perf_counter() - start
    handle = model.register_forward_pre_hook(_count_examples(ctx))
    channels_last = _channels_last(model, ctx)
    try:
        with memory_format(model, channels_last):  # NHWC for the method's loops, the weights back after
            out = method.fn(model, forget, retain, p, ctx)
            if out is not model and channels_last:
                out.to(memory_format=torch.contiguous_format)  # a new module leaves in the usual layout
    finally:
        handle.remove()
    for m in out.modules():  # a deep copy made inside the method carries the hook along: drop it
        for key, fn in list(m._forward_pre_hooks.items()):
            if getattr(fn, "__qualname__", "").startswith("_count_examples"):
                del m._forward_pre_hooks[key]
    return ensure_finite(out, name).eval()  # the returned model is always in eval mode (documented)


def describe_methods() -> str:
    """A readable listing of every registered method with its source and each hyperparameter."""
    lines: list[str] = []
    for name in sorted(METHODS):
        method = METHODS[name]
        preset = f", a preset of {method.preset_of}" if method.preset_of else ""
        lines.append(f"{name}: {method.summary}  [{method.source}{preset}]")
        fields = method.params.model_fields
        if not fields:
            lines.append("    (no hyperparameters)")
        common = MethodParams.model_fields  # the method's own hyperparameters first, then the shared ones
        for key, info in sorted(fields.items(), key=lambda kv: kv[0] in common):
            bounds = [f"{sym} {getattr(m, attr)}" for m in info.metadata
                      for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                      if getattr(m, attr, None) is not None]
            allowed = getattr(info.annotation, "__args__", None)
            if allowed and all(isinstance(a, str) for a in allowed):
                bounds.append("one of " + " | ".join(allowed))
            rng = f" [{', '.join(bounds)}]" if bounds else ""
            lines.append(f"    {key} = {info.default!r}{rng}  {info.description or ''}".rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
