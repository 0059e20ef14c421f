"""Model registry: every model normalizes its own inputs, so stored tensors stay raw."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from rumflow.errors import ConfigError
from rumflow.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model again from its weights."""

    name: str
    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class Normalize(nn.Module):
    """Subtract the per-channel mean and divide by the std (buffers, so they travel with the weights)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


Builder = Callable[[int, int], nn.Module]
MODELS: Registry[Builder] = Registry("model")
# The ordered blocks of each model's body, input to output with the head last (for "the last k layers").
BlockFn = Callable[[nn.Module], list[tuple[str, nn.Module]]]
BLOCKS: dict[str, BlockFn] = {}


def register_model(name: str, blocks: BlockFn | None = None) -> Callable[[Builder], Builder]:
    """Register `f(num_classes, in_channels) -> nn.Module` under `name`; `blocks(body)` lists its blocks."""
    if blocks is not None:
        BLOCKS[name] = blocks
    return MODELS.register(name)


def _group(body: nn.Module, spans: list[tuple[str, int, int]]) -> list[tuple[str, nn.Module]]:
    """Blocks of a flat Sequential as views (a Sequential over the same modules, so no weights are copied)."""
    mods = list(body.children())
    return [(name, nn.Sequential(*mods[a:b])) for name, a, b in spans]


def _small_cnn_blocks(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """block1..block3 (conv-BN-ReLU, the pool with block2), head (pool, flatten, linear)."""
    return _group(body, [("block1", 0, 3), ("block2", 3, 7), ("block3", 7, 10), ("head", 10, 13)])


def _resnet18_blocks(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """stem (conv1, bn1), layer1..layer4, fc."""
    stem = nn.Sequential(body.conv1, body.bn1)
    return [("stem", stem)] + [(f"layer{i}", getattr(body, f"layer{i}")) for i in range(1, 5)] + [("fc", body.fc)]


def _vgg16_bn_blocks(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """block1..block5 (the conv-BN-ReLU stages, each ending with its max pool), head (pool and MLP)."""
    mods = list(body.children())
    pools = [i for i, m in enumerate(mods) if isinstance(m, nn.MaxPool2d)]
    starts = [0] + [i + 1 for i in pools[:-1]]
    spans = [(f"block{k + 1}", a, b + 1) for k, (a, b) in enumerate(zip(starts, pools))]
    return _group(body, spans + [("head", pools[-1] + 1, len(mods))])


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register_model("small_cnn", blocks=_small_cnn_blocks)
def small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """Three conv-BN-ReLU blocks, global average pool, linear head (for 8x8 digits and 28x28 MNIST)."""
    return nn.Sequential(
        *_conv_bn(in_channels, 32), *_conv_bn(32, 64), nn.MaxPool2d(2), *_conv_bn(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )


@register_model("resnet18", blocks=_resnet18_blocks)
def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem (3x3 stride-1 conv1, no max pool)."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@register_model("vgg16_bn", blocks=_vgg16_bn_blocks)
def vgg16_bn(num_classes: int, in_channels: int) -> nn.Module:
    """VGG-16 with batch norm, adaptive pool to 2x2, head 2048-256-256-C."""
    layers: list[nn.Module] = []
    cin = in_channels
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += _conv_bn(cin, int(v))
            cin = int(v)
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(2048, 256), nn.ReLU(inplace=True), nn.Linear(256, 256), nn.ReLU(inplace=True),
        nn.Linear(256, num_classes),
    )


# Smallest input side a model can take (VGG's five 2x2 pools shrink 28x28 to nothing).
MIN_INPUT_SIZE = {"vgg16_bn": 32}


def check_input_size(name: str, size: int) -> None:
    """Stop early when the images are too small for the model."""
    need = MIN_INPUT_SIZE.get(name, 1)
    if size < need:
        raise ConfigError(f"model {name} needs images of at least {need}x{need} but the data set has "
                          f"{size}x{size}; choose small_cnn or resnet18 for this data set.")


# Seeding goes through the global RNG (fork_rng + manual_seed): threads must take turns.
INIT_LOCK = threading.Lock()


def create_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """Build `spec` with a seeded initialisation (the global RNG is left untouched; thread-safe)."""
    builder = MODELS.get(spec.name)
    with INIT_LOCK, torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        body = builder(spec.num_classes, spec.in_channels)
    net = nn.Sequential(Normalize(spec.mean, spec.std), body)
    net.arch = spec.name  # which block list applies (a plain attribute: not in the state dict, kept by deepcopy)
    return net


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ordered blocks of a model built by `create_model`, input to output, the head last.

    Names are stable (small_cnn: block1..block3, head; resnet18: stem, layer1..layer4, fc; vgg16_bn:
    block1..block5, head), so a config can name blocks or count the last k. Normalize is in no block."""
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ConfigError("this model has no registered architecture name; build it with "
                          "rumflow.models.create_model so its blocks are known.")
    if arch not in BLOCKS:
        raise ConfigError(f"model {arch} has no block list, so 'the last k blocks' means nothing for it; "
                          f"register it with @register_model({arch!r}, blocks=fn).")
    return BLOCKS[arch](model[1])


# Activation masks (methods/pruning.py, activation_pruning). A site is one call of an nn.ReLU module within a
# forward pass: call k of module M multiplies its output by the bool buffer `M.activation_mask_<k>` (shaped like
# one example's activation). Buffers live in state_dict(), so checkpoints carry them; a forward hook (not a
# closure: deep copies stay independent) applies them, and model_from_state re-attaches it before loading.
ACTIVATION_MASK = "activation_mask_"


def is_activation_mask(key: str) -> bool:
    """Whether a state-dict key names an activation-mask buffer."""
    return key.rsplit(".", 1)[-1].startswith(ACTIVATION_MASK)


def _reset_mask_calls(root: nn.Module, args: tuple) -> None:
    """Forward pre-hook on the root: every masked module starts counting its calls from site 0."""
    for m in root.modules():
        if hasattr(m, "_mask_sites"):
            m._mask_calls = 0


def _apply_activation_mask(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: zero the pruned units of this call site's output."""
    site = module._mask_calls % module._mask_sites
    module._mask_calls += 1
    return output * getattr(module, f"{ACTIVATION_MASK}{site}")


def attach_activation_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Register each `<module path>.activation_mask_<k>` of `masks` as a buffer of that module and hook it
    (a module hooked before only gets its buffers replaced)."""
    by_module: dict[str, dict[int, torch.Tensor]] = {}
    for key, mask in masks.items():
        path, _, name = key.rpartition(".")
        by_module.setdefault(path, {})[int(name[len(ACTIVATION_MASK):])] = mask
    for path, sites in by_module.items():
        module = model.get_submodule(path)
        if sorted(sites) != list(range(len(sites))):
            raise ValueError(f"activation masks of {path or 'the model'} are not numbered 0..{len(sites) - 1}")
        for k, mask in sites.items():
            module.register_buffer(f"{ACTIVATION_MASK}{k}", mask.detach().clone().bool())
        if not hasattr(module, "_mask_sites"):
            module.register_forward_hook(_apply_activation_mask)
        module._mask_sites, module._mask_calls = len(sites), 0
    if by_module and not getattr(model, "_mask_root", False):
        model.register_forward_pre_hook(_reset_mask_calls)
        model._mask_root = True
    return model


def restore_activation_masks(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Re-attach the activation masks a saved state carries, before load_state_dict (no-op without any)."""
    return attach_activation_masks(model, {k: v for k, v in state.items() if is_activation_mask(k)})


def _lenet_bn_blocks(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """block1..block3 (conv-BN-ReLU-pool), fc (pool to 3x3, flatten, linear, ReLU), head (the last linear)."""
    return _group(body, [("block1", 0, 4), ("block2", 4, 8), ("block3", 8, 12), ("fc", 12, 16), ("head", 16, 17)])


@register_model("lenet_bn", blocks=_lenet_bn_blocks)
def lenet_bn(num_classes: int, in_channels: int) -> nn.Module:
    """A LeNet-sized net for CPU work on MNIST: three conv-BN-ReLU-pool stages (16, 32, 64 channels), a
    128-unit hidden layer, ~2 MMAC per 28x28 image; over 99% MNIST test accuracy in 4 epochs."""
    return nn.Sequential(
        *_conv_bn(in_channels, 16), nn.MaxPool2d(2), *_conv_bn(16, 32), nn.MaxPool2d(2),
        *_conv_bn(32, 64), nn.MaxPool2d(2),
        # 28 -> 14 -> 7 -> 3 on MNIST (the pool is then the identity); other sizes are brought to 3x3.
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(64 * 9, 128), nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )
