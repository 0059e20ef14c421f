"""The fast-path switches: FP32 is the plain loop, the CPU default is fp32 channels-last, bf16 autocast works on CPU."""
import math

import pytest
import torch
import torch.nn.functional as F

from rumflow.artifacts.checkpoints import state_digest
from rumflow.config import TrainConfig, load_config
from rumflow.data import load_dataset
from rumflow.errors import ConfigError
from rumflow.models import ModelSpec, create_model
from rumflow.runtime import recipe
from rumflow.training import (FP32, FastPath, Recipe, accuracy, minibatches, predict, sgd, train_model)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small():
    ds = load_dataset("digits")
    return ds, ds.train.take(ds.train.ids()[:300]), ModelSpec("small_cnn", 10, 1, ds.mean, ds.std)


def plain_loop(model: torch.nn.Module, split, r: Recipe, seed: int) -> None:
    """The training loop as it was before the switches: fp32, NCHW, SGD + cosine over seeded batches."""
    gen = torch.Generator().manual_seed(seed)
    opt = sgd(model, r.lr, r.momentum, r.weight_decay)
    steps = [list(minibatches(len(split), r.batch_size, gen, CPU)) for _ in range(r.epochs)]
    total = sum(len(s) for s in steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    model.train()
    for epoch in steps:
        for idx in epoch:
            loss = F.cross_entropy(model(split.x[idx]), split.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def test_auto_means_fp32_channels_last_on_cpu_and_bf16_channels_last_on_cuda():
    fast = FastPath()
    assert fast.autocast_dtype(CPU) is None and fast.use_channels_last(CPU)
    assert not FP32.use_channels_last(CPU) and FP32.autocast_dtype(torch.device("cuda")) is None
    assert fast.use_channels_last(torch.device("cuda"))
    assert FastPath("bf16", True).autocast_dtype(CPU) is torch.bfloat16
    assert FastPath("bf16", True).use_channels_last(CPU)
    assert recipe(TrainConfig()).fast == FastPath()  # the config's defaults are the auto switches


def test_fp32_is_bit_identical_to_the_plain_loop_and_the_cpu_default_is_its_nhwc_twin(small):
    _, split, spec = small
    r = Recipe(2, 0.05, 32)
    reference = create_model(spec, seed=1)
    plain_loop(reference, split, r, seed=5)
    model = create_model(spec, seed=1)
    train_model(model, split, Recipe(2, 0.05, 32, fast=FP32), seed=5)
    assert state_digest(model.state_dict()) == state_digest(reference.state_dict())
    # The CPU default (auto) is fp32 channels-last: exactly the explicit switch, and deterministic.
    digests = set()
    for fast in (FastPath(), FastPath("fp32", True), FastPath()):
        nhwc = create_model(spec, seed=1)
        train_model(nhwc, split, Recipe(2, 0.05, 32, fast=fast), seed=5)
        assert all(p.is_contiguous() for p in nhwc.parameters())
        digests.add(state_digest(nhwc.state_dict()))
    assert len(digests) == 1


def test_bf16_autocast_on_cpu_trains_to_finite_fp32_weights(small):
    ds, split, spec = small
    fp32, bf16 = create_model(spec, seed=2), create_model(spec, seed=2)
    train_model(fp32, split, Recipe(3, 0.05, 32), seed=0)
    result = train_model(bf16, split, Recipe(3, 0.05, 32, fast=FastPath("bf16", False)), seed=0,
                         record_events=True)
    params = list(bf16.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert result.events.dtype == torch.float32 and torch.isfinite(result.events).all()
    assert result.mean_loss < math.log(10)  # it learned something, below the uniform guess
    # autocast really ran: bf16 matmuls round differently, so the weights are not the fp32 ones
    assert state_digest(bf16.state_dict()) != state_digest(fp32.state_dict())
    logits = predict(bf16, ds.test.x, fast=FastPath("bf16", False))
    assert logits.dtype == torch.float32
    assert (logits.argmax(1) == predict(bf16, ds.test.x).argmax(1)).float().mean() > 0.9


def test_channels_last_gives_the_same_predictions_and_leaves_weights_contiguous(small):
    ds, split, spec = small
    model = create_model(spec, seed=3)
    train_model(model, split, Recipe(1, 0.05, 32), seed=0)
    nchw = predict(model, ds.test.x, fast=FP32)
    nhwc = predict(model, ds.test.x, fast=FastPath("fp32", True))
    assert torch.allclose(nchw, nhwc, atol=1e-4, rtol=1e-4)
    assert all(p.is_contiguous() for p in model.parameters())
    # Training channels-last follows the same trajectory up to float reassociation, and the model can
    # train again afterwards (its weights did not become inference tensors in predict).
    a, b = create_model(spec, seed=4), create_model(spec, seed=4)
    train_model(a, split, Recipe(2, 0.05, 32, fast=FP32), seed=0)
    train_model(b, split, Recipe(2, 0.05, 32, fast=FastPath("fp32", True)), seed=0)
    assert all(p.is_contiguous() for p in b.parameters())
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa.float(), pb.float(), atol=1e-3, rtol=1e-3), name
    assert abs(accuracy(a, ds.test) - accuracy(b, ds.test)) < 0.02


def test_switches_are_validated_in_the_config():
    cfg = load_config(None, ["train.precision=bf16", "train.channels_last=true", "train.compile=true"])
    assert recipe(cfg.train).fast == FastPath("bf16", True, True)
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.channels_last"):
        load_config(None, ["train.channels_last=sometimes"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_defaults_train_in_bf16_channels_last_with_data_on_the_device(small):
    ds, split, spec = small
    cuda = torch.device("cuda")
    assert FastPath().autocast_dtype(cuda) is torch.bfloat16 and FastPath().use_channels_last(cuda)
    on_gpu = split.to(cuda)
    fast, plain = create_model(spec, seed=5).to(cuda), create_model(spec, seed=5).to(cuda)
    train_model(fast, on_gpu, Recipe(3, 0.05, 32), seed=0)
    train_model(plain, on_gpu, Recipe(3, 0.05, 32, fast=FP32), seed=0)
    assert all(torch.isfinite(p).all() and p.is_contiguous() for p in fast.parameters())
    test_x = ds.test.x.to(cuda)
    agree = (predict(fast, test_x).argmax(1) == predict(plain, test_x).argmax(1)).float().mean()
    assert agree > 0.9
    logits = predict(fast, test_x, fast=FastPath())
    assert logits.dtype == torch.float32 and logits.device.type == "cuda"


@pytest.mark.parametrize("method", ["finetune", "neggrad_plus", "bad_teaching"])
def test_methods_run_channels_last_and_return_contiguous_weights(small, method):
    """run_method puts the weights in NHWC for the method's loops (the CPU default) and gives them back
    in the usual layout, also when the method returns a new module; FP32 keeps NCHW throughout."""
    from rumflow.methods.registry import UnlearnContext, run_method
    from rumflow.training import is_channels_last

    ds, split, spec = small
    for fast, expected in ((FastPath(), True), (FP32, False)):
        model = create_model(spec, seed=0)
        seen: list[bool] = []
        model.register_forward_pre_hook(lambda m, args: seen.append(is_channels_last(m)))
        ctx = UnlearnContext(seed=0, recipe=Recipe(1, 0.05, 32, fast=fast),
                             fresh_model=lambda: create_model(spec, seed=9))
        out = run_method(method, {"epochs": 1}, model, split.take(split.ids()[:20]), split.take(split.ids()[20:]), ctx)
        assert seen and set(seen) == {expected}
        assert all(p.is_contiguous() for p in out.parameters())
