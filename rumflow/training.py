"""The one training loop (also used to retrain references) and the batched helpers around it."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import ContextManager, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from rumflow.data import Split
from rumflow.errors import DivergenceError
from rumflow.proxies.learning_events import learning_event_stats

# An epoch's mean loss beyond this is an explosion, not learning: CE of a uniform guess over 100 classes
# is 4.6, and a forget CE of 1,000 means p[y] = e^-1000; seed 002's divergent NegGrad+ reached -1e17,
# and on digits a NegGrad+ run that ended at -2,195 had test accuracy 0.09.
EXPLODED = 1e3


@dataclass(frozen=True)
class FastPath:
    """Fast-path switches. 'auto' precision means bf16 on CUDA and fp32 elsewhere; 'auto' channels_last
    means NHWC on CUDA and on CPU alike (oneDNN's NHWC kernels: 1.4-1.6x faster training on this
    project's models on one CPU thread, the NCHW max-pool alone was 12% of a step). fp32 NHWC on CPU is
    deterministic but not bit-identical to NCHW (float reassociation); FP32 is the plain NCHW path."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: Literal["auto"] | bool = "auto"
    compile: bool = False  # torch.compile the training forward/backward (one compile per training run)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 when asked, or on 'auto' for a CUDA device that supports it; None means plain fp32."""
        if self.precision == "bf16":
            return torch.bfloat16
        if self.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def use_channels_last(self, device: torch.device) -> bool:
        """NHWC tensors for the convolutions; 'auto' means on for CUDA and CPU (not for other devices)."""
        if self.channels_last == "auto":
            return device.type in ("cuda", "cpu")
        return bool(self.channels_last)


FP32 = FastPath(precision="fp32", channels_last=False, compile=False)
EVAL = FastPath(precision="fp32")  # fp32 logits in the auto layout


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """Autocast to `dtype` on `device`, or nothing at all (not a disabled autocast) for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's first 4-D weight is held channels-last (False for a model without one)."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[1] > 1:  # a 1-channel kernel is both layouts at once
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


@contextlib.contextmanager
def memory_format(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """Hold `model`'s weights channels-last inside the block and give them back in the layout they came
    in (nested blocks are no-ops), so the model and every checkpoint of it leave as they came."""
    if not channels_last or is_channels_last(model):
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def as_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A batch in the memory format the model expects (4-D images only)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@dataclass(frozen=True)
class Recipe:
    """Optimiser settings of one SGD training run (and the fast-path switches it runs under)."""

    epochs: int
    lr: float
    batch_size: int
    momentum: float = 0.9
    weight_decay: float = 5e-4
    cosine: bool = True
    fast: FastPath = field(default_factory=FastPath)


@dataclass
class TrainResult:
    """What a training run leaves besides the weights."""

    seconds: float
    events: torch.Tensor | None  # [N, 4] mean over epochs, rows in the split's order
    mean_loss: float
    events_seconds: float = 0.0  # host time spent recording events (exact on CPU; launch time on GPU)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_bounds(n: int, batch_size: int) -> list[int]:
    """Batch boundaries over n examples; a last batch of one joins the previous (BatchNorm needs 2)."""
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return bounds


def batches_per_epoch(n: int, batch_size: int) -> int:
    """How many mini-batches `minibatches` yields for n examples."""
    return len(batch_bounds(n, batch_size)) - 1


def minibatches(n: int, batch_size: int, gen: torch.Generator, device: torch.device,
                shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Index tensors covering 0..n-1 once, split at `batch_bounds`."""
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    order = order.to(device)
    bounds = batch_bounds(n, batch_size)
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield order[a:b]


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding `pad`) and horizontal flip, for the whole batch at once."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))
    cols = torch.where(flip[:, None], cols.flip(-1), cols)[:, None, None, :]
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
        params: list[torch.Tensor] | None = None) -> torch.optim.SGD:
    """The SGD optimiser every recipe in this project uses."""
    return torch.optim.SGD(model.parameters() if params is None else params, lr=lr,
                           momentum=momentum, weight_decay=weight_decay)


def check_loss(loss_sum: torch.Tensor, batches: int, what: str, epoch: int) -> float:
    """Mean epoch loss as a float; raises DivergenceError if it is non-finite or exploded (one sync)."""
    mean = float(loss_sum) / max(batches, 1)
    if not math.isfinite(mean) or abs(mean) > EXPLODED:
        raise DivergenceError(
            f"{what} diverged in epoch {epoch + 1} (mean loss {mean:.3g}); lower its learning rate "
            "or, for neggrad_plus, raise alpha; no model was saved.")
    return mean


def train_model(model: nn.Module, split: Split, recipe: Recipe, seed: int, augment: bool = False,
                record_events: bool = False) -> TrainResult:
    """Train `model` in place with SGD + momentum + weight decay (+ cosine), optionally recording
    the learning-event proxies of every example from the training forward pass."""
    device = split.x.device
    dtype, channels_last = recipe.fast.autocast_dtype(device), recipe.fast.use_channels_last(device)
    with memory_format(model, channels_last):
        return _train(model, split, recipe, seed, augment, record_events, dtype, channels_last)


def _train(model: nn.Module, split: Split, recipe: Recipe, seed: int, augment: bool, record_events: bool,
           dtype: torch.dtype | None, channels_last: bool) -> TrainResult:
    """The loop of `train_model`, with the fast-path choices already resolved."""
    device = split.x.device
    gen = torch.Generator().manual_seed(seed)
    # The optimizer is built after the layout change, so its state follows the weights' format.
    opt = sgd(model, recipe.lr, recipe.momentum, recipe.weight_decay)
    # The compiled module shares the parameters, so training it trains `model` in place.
    forward = torch.compile(model, dynamic=False) if recipe.fast.compile else model
    n = len(split)
    total = recipe.epochs * batches_per_epoch(n, recipe.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda t: 0.5 * (1 + math.cos(math.pi * t / max(total, 1)))) if recipe.cosine else (lambda t: 1.0))
    events = torch.zeros(n, 4, device=device) if record_events else None
    mean_loss, events_seconds = float("nan"), 0.0
    sync(device)
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        model.train()
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in minibatches(n, recipe.batch_size, gen, device):
            xb, yb = split.x[idx], split.y[idx]
            if augment:
                xb = augment_batch(xb, gen)
            with autocast(device, dtype):
                logits = forward(as_input(xb, channels_last))
                loss = F.cross_entropy(logits, yb)  # autocast computes the loss in fp32
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            batches += 1
            if events is not None:
                t0 = time.perf_counter()
                events.index_add_(0, idx, learning_event_stats(logits.detach().float(), yb))
                events_seconds += time.perf_counter() - t0
        mean_loss = check_loss(loss_sum, batches, "training", epoch)
    sync(device)
    seconds = time.perf_counter() - start
    if events is not None:
        events /= max(recipe.epochs, 1)
    return TrainResult(seconds=seconds, events=events, mean_loss=mean_loss, events_seconds=events_seconds)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 2048, fast: FastPath | None = None) -> torch.Tensor:
    """Eval-mode fp32 logits for `x`, in batches. By default fp32 (the metrics and the attack read these
    logits) in the 'auto' layout; pass `fast` (e.g. FastPath()) for bf16 inference, FP32 for plain NCHW."""
    fast = EVAL if fast is None else fast
    model.eval()
    if len(x) == 0:
        return torch.zeros(0, device=x.device)
    dtype, channels_last = fast.autocast_dtype(x.device), fast.use_channels_last(x.device)
    # The layout change happens outside inference mode: weights rewritten inside it could not train again.
    with memory_format(model, channels_last), torch.inference_mode(), autocast(x.device, dtype):
        out = [model(as_input(x[i:i + batch_size], channels_last)) for i in range(0, len(x), batch_size)]
        return torch.cat(out).float()


def accuracy(model: nn.Module, split: Split) -> float:
    """Top-1 accuracy on `split` as a fraction (nan for an empty split)."""
    if len(split) == 0:
        return float("nan")
    return float((predict(model, split.x).argmax(1) == split.y).float().mean())
