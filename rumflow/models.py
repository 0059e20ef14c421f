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


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register `f(num_classes, in_channels) -> nn.Module` under `name`."""
    return MODELS.register(name)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register_model("small_cnn")
def small_cnn(num_classes: int, in_channels: int) -> nn.Module:
    """Three conv-BN-ReLU blocks, global average pool, linear head (for 8x8 digits and 28x28 MNIST)."""
    return nn.Sequential(
        *_conv_bn(in_channels, 32), *_conv_bn(32, 64), nn.MaxPool2d(2), *_conv_bn(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem (3x3 stride-1 conv1, no max pool)."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@register_model("vgg16_bn")
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
    return nn.Sequential(Normalize(spec.mean, spec.std), body)
