"""The model registry: shapes, seeded initialisation, architectures of SPEC section 2, Normalize."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rumflow.errors import ConfigError
from rumflow.models import MODELS, ModelSpec, Normalize, create_model

# (model, channels, size) combinations each registered model must handle.
CASES = [
    ("small_cnn", 1, 8),    # digits
    ("small_cnn", 1, 28),   # mnist
    ("small_cnn", 3, 32),
    ("resnet18", 1, 28),
    ("resnet18", 3, 32),    # cifar
    ("vgg16_bn", 3, 32),    # cifar
    ("lenet_bn", 1, 28),    # mnist
    ("lenet_bn", 1, 8),
]


def _spec(name: str, channels: int, classes: int = 10) -> ModelSpec:
    mean = tuple(0.1 * (i + 1) for i in range(channels))
    std = tuple(0.2 + 0.05 * i for i in range(channels))
    return ModelSpec(name, classes, channels, mean, std)


def _weights_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_registered_model_is_covered():
    assert {name for name, _, _ in CASES} == set(MODELS)


@pytest.mark.parametrize("name,channels,size", CASES)
def test_logits_shape(name, channels, size):
    classes = 7
    model = create_model(_spec(name, channels, classes), seed=0)
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():  # eval only: a train-mode pass would double the cost for no new information
        out = model.eval()(x)
    assert out.shape == (2, classes) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seeded_init(name):
    channels = 1 if name == "small_cnn" else 3
    spec = _spec(name, channels)
    state = torch.random.get_rng_state()
    a, b, c = create_model(spec, seed=3), create_model(spec, seed=3), create_model(spec, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert _weights_equal(a, b)
    assert not _weights_equal(a, c)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_normalize_is_first_and_saved(name):
    channels = 1 if name == "small_cnn" else 3
    spec = _spec(name, channels)
    model = create_model(spec, seed=0)
    first = next(iter(model.children()))
    assert isinstance(first, Normalize)
    sd = model.state_dict()
    assert torch.allclose(sd["0.mean"].flatten(), torch.tensor(spec.mean))
    assert torch.allclose(sd["0.std"].flatten(), torch.tensor(spec.std))
    # The stats travel with the weights: loading them into a model built with other stats restores them.
    other = create_model(ModelSpec(name, 10, channels, (0.0,) * channels, (1.0,) * channels), seed=0)
    other.load_state_dict(sd)
    assert _weights_equal(model, other)


def test_normalize_math():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 2.0, 1.0))
    x = torch.rand(2, 3, 4, 4)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 2.0, x[:, 2]], dim=1)
    assert torch.allclose(norm(x), expected)
    model = create_model(_spec("small_cnn", 1), seed=0).eval()
    x1 = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x1), model[1]((x1 - 0.1) / 0.2), atol=1e-6)


def test_resnet18_cifar_stem():
    body = create_model(_spec("resnet18", 3), seed=0)[1]
    conv1 = body.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert conv1.in_channels == 3 and conv1.out_channels == 64 and conv1.bias is None
    assert isinstance(body.maxpool, nn.Identity)
    assert body.fc.in_features == 512 and body.fc.out_features == 10
    assert create_model(_spec("resnet18", 1), seed=0)[1].conv1.in_channels == 1


def test_vgg16_bn_architecture():
    classes = 13
    body = create_model(_spec("vgg16_bn", 3, classes), seed=0)[1]
    mods = list(body.children())
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13  # VGG-16: 13 conv + 3 linear
    assert sum(isinstance(m, nn.BatchNorm2d) for m in mods) == 13
    assert sum(isinstance(m, nn.MaxPool2d) for m in mods) == 5
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    pools = [m for m in mods if isinstance(m, nn.AdaptiveAvgPool2d)]
    assert len(pools) == 1 and pools[0].output_size in (2, (2, 2))
    head = mods[mods.index(pools[0]) + 1:]
    assert isinstance(head[0], nn.Flatten)
    kinds = [type(m) for m in head[1:]]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    lin = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(2048, 256), (256, 256), (256, classes)]


def test_unknown_model():
    with pytest.raises(ConfigError, match="unknown model"):
        create_model(ModelSpec("nope", 10, 3, (0.0,) * 3, (1.0,) * 3))


def test_vgg16_bn_refuses_small_images_with_one_sentence():
    from rumflow.errors import ConfigError
    from rumflow.models import check_input_size

    with pytest.raises(ConfigError, match="vgg16_bn needs images of at least 32x32"):
        check_input_size("vgg16_bn", 28)
    check_input_size("vgg16_bn", 32)
    check_input_size("small_cnn", 8)


# --- ordered blocks (for "the last k blocks": cf_k, eu_k, selective_finetune) --------------------------
BLOCK_NAMES = {
    "small_cnn": ["block1", "block2", "block3", "head"],
    "resnet18": ["stem", "layer1", "layer2", "layer3", "layer4", "fc"],
    "vgg16_bn": ["block1", "block2", "block3", "block4", "block5", "head"],
    "lenet_bn": ["block1", "block2", "block3", "fc", "head"],
}


def test_every_registered_model_has_stable_block_names():
    from rumflow.models import BLOCKS, blocks

    assert set(BLOCKS) == set(MODELS)
    for name, expected in BLOCK_NAMES.items():
        channels = 1 if name == "small_cnn" else 3
        assert [n for n, _ in blocks(create_model(_spec(name, channels), seed=0))] == expected


@pytest.mark.parametrize("name", sorted(BLOCK_NAMES))
def test_blocks_partition_the_weights_in_forward_order_with_the_head_last(name):
    from rumflow.models import blocks

    channels, size = (1, 8) if name == "small_cnn" else (3, 32)
    model = create_model(_spec(name, channels, classes=7), seed=0)
    listed = blocks(model)
    # every parameter and buffer of the body is in exactly one block (Normalize in none)
    owner: dict[int, str] = {}
    for block_name, block in listed:
        for t in list(block.parameters()) + list(block.buffers()):
            assert id(t) not in owner, f"{name}: a tensor is in {owner[id(t)]} and {block_name}"
            owner[id(t)] = block_name
    body = model[1]
    assert set(owner) == {id(t) for t in list(body.parameters()) + list(body.buffers())}
    assert not any(id(t) in owner for t in model[0].buffers())
    # the blocks run in the listed order: the first call of each block's first weighted module
    order: list[str] = []
    hooks = []
    for block_name, block in listed:
        first = next(m for m in block.modules() if list(m.parameters(recurse=False)))
        hooks.append(first.register_forward_hook(
            lambda *_, n=block_name: order.append(n) if n not in order else None))
    with torch.no_grad():
        model.eval()(torch.rand(2, channels, size, size))
    for h in hooks:
        h.remove()
    assert order == [n for n, _ in listed]
    # the head holds the output layer
    last = [m for m in listed[-1][1].modules() if isinstance(m, nn.Linear)][-1]
    assert last.out_features == 7 and last is [m for m in body.modules() if isinstance(m, nn.Linear)][-1]


def test_blocks_are_views_of_the_model_not_copies():
    from rumflow.models import blocks

    model = create_model(_spec("small_cnn", 1), seed=0)
    head = dict(blocks(model))["head"]
    with torch.no_grad():
        next(head.parameters()).add_(1.0)
    assert torch.equal(next(head.parameters()), model[1][-1].weight)


def test_model_without_block_list_gets_one_sentence():
    from rumflow.models import blocks

    model = create_model(_spec("small_cnn", 1), seed=0)
    model.arch = "tiny_mlp"
    with pytest.raises(ConfigError, match=r"model tiny_mlp has no block list.*register_model\('tiny_mlp', blocks=fn\)"):
        blocks(model)
    with pytest.raises(ConfigError, match="build it with rumflow.models.create_model"):
        blocks(nn.Sequential(nn.Linear(2, 2)))
