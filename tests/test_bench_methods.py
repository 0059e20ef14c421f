"""bench/methods.py: the per-data-set settings files validate, and the worker pool runs, stops and caches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rumflow.methods import METHODS, validate_params

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = sorted((ROOT / "methods").glob("*.yaml"))


def rows(path: Path) -> dict[str, tuple[str, dict]]:
    """label -> (method, hyperparameters) of a settings file, the `experiment:` block left out."""
    entries = yaml.safe_load(path.read_text()) or {}
    out = {}
    for label, entry in entries.items():
        if label == "experiment":
            continue
        entry = dict(entry or {})
        out[label] = (entry.pop("method", label), entry)
    return out


@pytest.mark.parametrize("path", SETTINGS, ids=[p.name for p in SETTINGS])
def test_methods_yaml_rows_validate(path):
    for label, (method, params) in rows(path).items():
        validate_params(method, params)  # raises ConfigError naming the row's problem


def test_methods_yaml_mnist_has_a_row_for_every_method():
    covered = {method for method, _ in rows(ROOT / "methods" / "mnist.yaml").values()}
    assert sorted(set(METHODS) - covered) == ["retrain"]  # retrain is the table's reference row


def test_methods_yaml_mnist_rows_are_budgeted():
    """A row that loops over D_r visits at most 15% of it in all (share per epoch x epochs), in at most 3
    epochs: a few percent of the 4-epoch retrain."""
    # loops over D_f only, or over D_f and a subset of D_r of fixed size (a multiple of |D_f|)
    forget_only = ("neggrad", "boundary_shrink", "bad_teaching_retain_subset", "bad_teaching_similarity")
    for label, (method, params) in rows(ROOT / "methods" / "mnist.yaml").items():
        p = validate_params(method, params)
        if method.startswith("unsir"):  # its retain_fraction is a share of a 10,000-example subset
            assert p.retain_fraction <= 0.2, label
        elif hasattr(p, "retain_fraction") and label not in forget_only:
            assert p.retain_fraction * max(1, getattr(p, "epochs", 1)) <= 0.15 + 1e-9, label
        assert getattr(p, "epochs", 0) <= 3, label


def test_bench_jobs_row_timeout_and_cache(tmp_path):
    """Two workers: a quick row passes through, a 100-epoch row is stopped; a second call trains nothing."""
    config = tmp_path / "rows.yaml"
    config.write_text("none: {}\nneggrad: {lr: 0.01, epochs: 1, batch_size: 16}\n")
    cmd = [sys.executable, str(ROOT / "bench" / "methods.py"), "--epochs", "2", "--per-tier", "5", "--jobs", "2",
           "--row-timeout", "3", "--cache", str(tmp_path / "cache"), "--config", str(config),
           "--methods", "none", "neggrad", "finetune_cosine"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    lines = first.stdout.splitlines()
    labels = [ln.split()[0] for ln in lines if ln.split()[:1] in (["none"], ["neggrad"], ["finetune_cosine"])]
    # table order: document rows sorted, then the tuned rows in file order
    assert labels == ["finetune_cosine", "neggrad", "none", "none", "neggrad"], first.stdout + first.stderr
    stopped = [ln for ln in lines if ln.startswith("finetune_cosine")]
    assert "STOPPED after 3 s (>" in stopped[0] and "x retrain)" in stopped[0], first.stdout
    assert any(ln.startswith("none") and ln.endswith("(baseline)") for ln in lines), first.stdout
    assert first.returncode == 1  # the stopped row counts as a failure
    assert "loaded from" not in first.stdout
    meta = next((tmp_path / "cache").glob("*/meta.json"))
    stamp = meta.stat().st_mtime_ns
    # no rows: the original and the reference only, loaded from the cache
    second = subprocess.run(cmd[:-3] + ["no_such_row"], capture_output=True, text=True, env=env, timeout=180)
    assert "loaded from" in second.stdout and second.returncode == 0, second.stdout + second.stderr
    assert meta.stat().st_mtime_ns == stamp
