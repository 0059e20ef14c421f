"""Benchmark every unlearning method against the retrain reference, at the document's settings and at
settings that work on the data set.

    python bench/methods.py                                   # digits, both settings, every method
    python bench/methods.py --settings tuned --methods scrub salun
    python bench/methods.py --jobs 2 --row-timeout 5 --methods finetune scrub unsir neggrad_plus
    OMP_NUM_THREADS=1 python bench/methods.py --data mnist --root data/mnist --model lenet_bn --epochs 4 \\
        --per-tier 1000 --jobs 2 --row-timeout 100 --cache data/bench-cache   # both settings, MNIST
    ... --mia-max-shadow 2000    # a row's evaluation on MNIST: ~15 s instead of ~65 s (the SVC MIA's fit)

Trains the original model (seed, the original recipe) recording the learning-event proxies, takes one
forget request of 3 x per-tier examples (the low / mid / high `confidence` tiers, disjoint), retrains the
reference on D_train minus that request, then runs every method on a copy of the original:
- `document` rows use each method's registered defaults (the source document's values);
- `tuned` rows use the data set's settings file (methods/<data>.yaml; a row may name its method with
  `method:`, so one method can appear twice).
Each row prints forget / retain / test accuracy, ToW and ToW-MIA against the reference, NoMUS, and RTE
(wall seconds including the method's preparation / retrain seconds). A method passes when it lowers
forget accuracy below the original's while keeping test accuracy within 5 points of it.

The rows run in `--jobs` worker processes (spawned, one torch thread each; `sec` is a row's own wall
seconds in its worker). The parent trains the original and the reference once and saves their weights,
the forget plan and their figures under `--cache` (default: a folder in the system temp dir), keyed by a
digest of data / root / model / epochs / batch size / per-tier / seed, so a second invocation with the
same setup trains nothing (delete the folder after changing the training code). With `--row-timeout`, a
row whose method still runs after that many seconds (its evaluation is not counted) is stopped, its worker
killed and replaced, and printed as STOPPED without figures. Rows print in table order as soon as every row above them is done.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import yaml

from rumflow.config import EvaluateConfig
from rumflow.data import Dataset, load_dataset
from rumflow.errors import DivergenceError, RumflowError
from rumflow.evaluation import evaluate_model
from rumflow.methods import METHODS, UnlearnContext, run_method, validate_params
from rumflow.metrics import tow, tow_mia
from rumflow.models import ModelSpec, create_model
from rumflow.planning import StepPlan, select_tiers
from rumflow.proxies.learning_events import LEARNING_EVENTS
from rumflow.proxies.registry import memorization_of
from rumflow.training import Recipe, sync, train_model

ROOT = Path(__file__).resolve().parents[1]
CACHE_VERSION = 1  # bump when what the cache holds changes
Row = tuple[str, str, str, dict[str, Any]]  # label, settings kind, method, hyperparameters (validated)


def rows_of(args: argparse.Namespace) -> list[Row]:
    """(label, settings kind, method, validated hyperparameters as a dict) for every row asked for."""
    rows: list[Row] = []
    if args.settings in ("document", "both"):
        rows += [(n, "document", n, {}) for n in sorted(METHODS) if n != "retrain"]
    if args.settings in ("tuned", "both"):
        path = Path(args.config or ROOT / "methods" / f"{args.data}.yaml")
        entries = yaml.safe_load(path.read_text()) or {} if path.is_file() else {}
        for label, entry in entries.items():
            if label == "experiment":  # the default experiment's tier settings, not a table row
                continue
            entry = dict(entry or {})
            method = entry.pop("method", label)
            validate_params(method, entry)  # bad rows fail here, in the parent, before any training
            rows.append((label, "tuned", method, entry))
    if args.methods:
        rows = [r for r in rows if r[0] in args.methods or r[2] in args.methods]
    return rows


def setup_key(args: argparse.Namespace) -> dict[str, Any]:
    """What the original, the reference and the forget plan depend on (the cache key)."""
    root = str(Path(args.root).resolve()) if args.root else None
    return {"version": CACHE_VERSION, "data": args.data, "root": root, "model": args.model,
            "epochs": args.epochs, "batch_size": args.batch_size, "per_tier": args.per_tier, "seed": args.seed,
            "mia_max_shadow": args.mia_max_shadow, "torch": torch.__version__}


def cache_dir(args: argparse.Namespace) -> Path:
    """The cache folder of this setup: <cache>/<digest of setup_key>."""
    base = Path(args.cache) if args.cache else Path(tempfile.gettempdir()) / "rumflow-bench-methods"
    digest = hashlib.sha256(json.dumps(setup_key(args), sort_keys=True).encode()).hexdigest()[:16]
    return base / digest


@dataclass
class Setup:
    """Everything a row needs besides its method: the data, the models, the plan and the reference."""

    ds: Dataset
    spec: ModelSpec
    recipe: Recipe
    plan: StepPlan
    device: torch.device
    seed: int
    evaluate: EvaluateConfig
    meta: dict[str, Any] = field(default_factory=dict)  # seconds and figures of the original / reference


def load_data(args: argparse.Namespace, device: torch.device) -> tuple[Dataset, ModelSpec, Recipe]:
    """The data set on `device`, the model spec and the original recipe."""
    ds = load_dataset(args.data, args.root).to(device)
    spec = ModelSpec(args.model, ds.num_classes, ds.in_channels, ds.mean, ds.std)
    return ds, spec, Recipe(epochs=args.epochs, lr=0.1, batch_size=args.batch_size)


def evaluate_config(args: argparse.Namespace) -> EvaluateConfig:
    """The evaluation settings: the flow's defaults, with the SVC MIA's shadow-set cap from the command line."""
    return EvaluateConfig(mia_max_shadow=args.mia_max_shadow)


def context(s: Setup) -> UnlearnContext:
    """A fresh method context (seed, original recipe, validation split, fresh-model factory)."""
    return UnlearnContext(seed=s.seed, recipe=s.recipe, val=s.ds.val,
                          fresh_model=lambda: create_model(s.spec, seed=s.seed).to(s.device))


def timed(s: Setup, original: torch.nn.Module, name: str, params: dict[str, Any]) -> tuple[torch.nn.Module, float]:
    """Run method `name` on a fresh copy of the original; (model, wall seconds)."""
    model = create_model(s.spec, seed=s.seed).to(s.device)
    model.load_state_dict(original.state_dict())
    forget, retain = s.ds.train.take(s.plan.mix), s.ds.train.drop(s.plan.mix)
    sync(s.device)
    start = time.perf_counter()
    out = run_method(name, validate_params(name, params), model, forget, retain, context(s))
    sync(s.device)
    return out, time.perf_counter() - start


def measure(s: Setup, model: torch.nn.Module) -> dict[str, float]:
    """The evaluation figures of `model` on this setup's forget request."""
    return {k: float(v) for k, v in evaluate_model(model, s.ds, s.plan, s.evaluate, s.seed).items()}


def model_from(s: Setup, path: Path) -> torch.nn.Module:
    """A model of this setup's spec with the weights saved at `path`."""
    model = create_model(s.spec, seed=s.seed).to(s.device)
    model.load_state_dict(torch.load(path, map_location=s.device, weights_only=True))
    return model.eval()


def warm_up(s: Setup, original: torch.nn.Module) -> None:
    """One SGD step and one evaluation on a throwaway copy: a process's first training step pays ~1 s of
    one-time setup that would otherwise land in its first row's seconds."""
    model, _ = timed(s, original, "finetune", {"epochs": 1, "retain_fraction": min(1.0, 2 * s.recipe.batch_size
                                                                                   / max(len(s.ds.train), 1))})
    measure(s, model)


def prepare(args: argparse.Namespace, device: torch.device) -> tuple[Setup, Path, bool]:
    """Train (or load from the cache) the original and the reference; (setup, cache folder, was cached)."""
    ds, spec, recipe = load_data(args, device)
    folder = cache_dir(args)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == setup_key(args):
            return Setup(ds, spec, recipe, StepPlan(**meta["plan"]), device, args.seed, evaluate_config(args),
                         meta), folder, True
    original = create_model(spec, seed=args.seed).to(device)
    trained = train_model(original, ds.train, recipe, seed=args.seed, record_events=True)
    conf = trained.events[:, LEARNING_EVENTS.index("confidence")].cpu().numpy()
    tiers = select_tiers(ds.train.ids(), memorization_of("confidence", conf), args.per_tier)
    s = Setup(ds, spec, recipe, StepPlan(step=1, before=[], **tiers), device, args.seed, evaluate_config(args))
    ref_model, ref_seconds = timed(s, original, "retrain", {})
    s.meta = {"key": setup_key(args), "plan": s.plan.model_dump(), "original_seconds": trained.seconds,
              "reference_seconds": ref_seconds, "threads": torch.get_num_threads(),
              "original": measure(s, original), "reference": measure(s, ref_model)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, model in (("original", original), ("reference", ref_model)):
        tmp = folder / f"{name}.pt.tmp{os.getpid()}"
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
        tmp.replace(folder / f"{name}.pt")
    tmp = folder / f"meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(s.meta))
    tmp.replace(meta_path)  # written last: a folder without it is never reused
    return s, folder, False


def worker(conn: Connection, args: argparse.Namespace, folder: str, device: str) -> None:
    """Worker process: load the setup once, then run (index, row) tasks until None; send results back."""
    torch.set_num_threads(1)
    dev = torch.device(device)
    ds, spec, recipe = load_data(args, dev)
    meta = json.loads((Path(folder) / "meta.json").read_text())
    s = Setup(ds, spec, recipe, StepPlan(**meta["plan"]), dev, args.seed, evaluate_config(args), meta)
    original = model_from(s, Path(folder) / "original.pt")
    warm_up(s, original)
    conn.send(("ready", None, None))
    while (task := conn.recv()) is not None:
        index, (label, kind, method, params) = task
        try:
            model, seconds = timed(s, original, method, params)
            conn.send(("timed", index, seconds))  # the row timeout covers the method, not its evaluation
            conn.send(("done", index, (measure(s, model), seconds)))
        except DivergenceError as exc:
            conn.send(("diverged", index, str(exc)))
        except Exception as exc:  # noqa: BLE001 - one row's bug must not end the table
            traceback.print_exc()
            conn.send(("error", index, f"{type(exc).__name__}: {exc}"))


class Pool:
    """N worker processes, one task each at a time, a worker killed and replaced when its task overruns."""

    def __init__(self, jobs: int, args: argparse.Namespace, folder: Path, device: torch.device):
        self.ctx = mp.get_context("spawn")
        self.spawn_args = (args, str(folder), str(device))
        self.workers: list[dict[str, Any]] = [self._start() for _ in range(jobs)]

    def _start(self) -> dict[str, Any]:
        """A fresh worker, not ready until it says so."""
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=worker, args=(child, *self.spawn_args), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "ready": False, "task": None, "since": 0.0}

    def _replace(self, w: dict[str, Any], needed: bool) -> None:
        """Kill worker `w` and put a fresh one in its place when rows are left for it (`needed`)."""
        w["proc"].kill()
        w["proc"].join()
        w["conn"].close()
        if needed:
            self.workers[self.workers.index(w)] = self._start()
        else:
            self.workers.remove(w)

    def run(self, rows: list[Row], timeout: float | None):
        """Yield (index, status, payload) for every row, in completion order."""
        todo = list(enumerate(rows))
        pending = len(todo)
        while pending:
            for w in self.workers:
                if w["ready"] and w["task"] is None and todo:
                    w["task"], w["since"] = todo.pop(0), time.perf_counter()
                    w["conn"].send(w["task"])
            busy = [w for w in self.workers if w["task"] is not None and w["since"] is not None]
            wait_s = None
            if timeout is not None and busy:
                wait_s = max(0.0, min(w["since"] + timeout for w in busy) - time.perf_counter())
            handles = [w["conn"] for w in self.workers] + [w["proc"].sentinel for w in self.workers]
            ready = wait(handles, wait_s)
            for w in list(self.workers):
                if w["conn"] in ready:
                    try:
                        status, index, payload = w["conn"].recv()
                    except (EOFError, OSError):
                        status = "crashed"
                    if status == "ready":
                        w["ready"] = True
                        continue
                    if status == "timed":  # the method is done; its evaluation has no deadline
                        w["since"] = None
                        continue
                    if status != "crashed":
                        w["task"] = None
                        pending -= 1
                        yield index, status, payload
                        continue
                if w["proc"].sentinel in ready or not w["proc"].is_alive():
                    if w["task"] is None and not w["ready"]:
                        raise RuntimeError(f"a bench worker died while loading (exit code {w['proc'].exitcode}); "
                                           "its traceback is above")
                    if w["task"] is not None:
                        pending -= 1
                        yield w["task"][0], "crashed", f"worker exit code {w['proc'].exitcode}"
                    self._replace(w, bool(todo))
                elif timeout is not None and w["task"] is not None and w["since"] is not None and \
                        time.perf_counter() - w["since"] >= timeout:
                    index = w["task"][0]
                    self._replace(w, bool(todo))
                    pending -= 1
                    yield index, "stopped", timeout

    def close(self) -> None:
        """Tell every ready worker to finish and wait for it; kill those still loading (they hold nothing)."""
        for w in self.workers:
            if not w["ready"]:
                w["proc"].kill()
                continue
            try:
                w["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
        for w in self.workers:
            w["proc"].join(timeout=10)
            if w["proc"].is_alive():
                w["proc"].kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits", help="digits | mnist | cifar10 | cifar100")
    ap.add_argument("--root", default=None, help="data folder (all but digits)")
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--epochs", type=int, default=30, help="epochs of the original and the reference")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--config", default=None, help="tuned settings (default: methods/<data>.yaml)")
    ap.add_argument("--settings", choices=["document", "tuned", "both"], default="both")
    ap.add_argument("--per-tier", type=int, default=20, help="forget examples per tier (3 tiers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the parent's original and "
                    "reference training (1 = stable timings on a shared box); workers always use 1")
    ap.add_argument("--methods", nargs="*", help="only these rows (labels or method names)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes running the rows")
    ap.add_argument("--row-timeout", type=float, default=None, metavar="SECONDS",
                    help="stop a row after this many seconds (its worker is killed and replaced)")
    ap.add_argument("--cache", default=None, help="folder for the original, the reference and the plan "
                    "(default: rumflow-bench-methods in the system temp dir); reused for the same setup")
    ap.add_argument("--mia-max-shadow", type=int, default=None, metavar="N",
                    help="at most N retain examples as the SVC MIA's shadow members (default: the flow's "
                    f"{EvaluateConfig().mia_max_shadow}; the SVC fit dominates a row's evaluation on MNIST)")
    args = ap.parse_args(argv)
    if args.mia_max_shadow is None:
        args.mia_max_shadow = EvaluateConfig().mia_max_shadow
    if args.mia_max_shadow < 10:
        ap.error(f"--mia-max-shadow must be at least 10, got {args.mia_max_shadow}")
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.row_timeout is not None and args.row_timeout <= 0:
        ap.error(f"--row-timeout must be a positive number of seconds, got {args.row_timeout}")
    torch.set_num_threads(args.threads)
    try:
        rows = rows_of(args)
    except RumflowError as exc:
        ap.error(str(exc))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s, folder, cached = prepare(args, device)
    orig, ref, ref_seconds = s.meta["original"], s.meta["reference"], s.meta["reference_seconds"]
    n_forget = len(s.plan.mix)

    print(f"# {args.data}, {args.model}, {len(s.ds.train)} train / {len(s.ds.test)} test, forget {n_forget} "
          f"(confidence tiers low/mid/high x {args.per_tier}), seed {args.seed}, original recipe "
          f"{args.epochs} epochs lr 0.1 batch {args.batch_size}")
    print(f"# {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{args.jobs} worker(s) x 1 thread; settings: {args.settings}; MIA shadow <= {args.mia_max_shadow}"
          + (f"; row timeout {args.row_timeout:g} s" if args.row_timeout else ""))
    print(f"# original trained in {s.meta['original_seconds']:.1f} s; retrain reference in {ref_seconds:.1f} s "
          f"({s.meta['threads']} thread(s)){'; both loaded from ' + str(folder) if cached else ''}")
    head = (f"{'method':<34}{'settings':>9}{'forget':>8}{'retain':>8}{'test':>7}{'ToW':>7}{'ToW-MIA':>8}"
            f"{'NoMUS':>7}{'sec':>8}{'RTE':>7}  result")
    print(head)
    print("-" * len(head), flush=True)

    def line(name: str, kind: str, r: dict, seconds: float, result: str) -> str:
        t = float(tow(r["acc_forget"], r["acc_retain"], r["acc_test"], ref["acc_forget"], ref["acc_retain"],
                      ref["acc_test"]))
        tm = float(tow_mia(r["mia"], r["acc_retain"], r["acc_test"], ref["mia"], ref["acc_retain"],
                           ref["acc_test"]))
        return (f"{name:<34}{kind:>9}{r['acc_forget']:>8.3f}{r['acc_retain']:>8.3f}{r['acc_test']:>7.3f}{t:>7.3f}"
                f"{tm:>8.3f}{r.get('nomus', float('nan')):>7.3f}{seconds:>8.2f}{seconds / ref_seconds:>7.3f}  "
                f"{result}")

    def outcome(row: Row, status: str, payload: Any) -> tuple[str, bool]:
        """The printed line of a finished row and whether it failed."""
        label, kind, method, _ = row
        if status == "stopped":
            return (f"{label:<34}{kind:>9}{'':>60}  STOPPED after {payload:g} s "
                    f"(> {payload / ref_seconds:.1f} x retrain)"), True
        if status != "done":
            what = {"diverged": "DIVERGED", "error": "ERROR", "crashed": "CRASHED"}[status]
            return f"{label:<34}{kind:>9}  {what}: {payload}", True
        r, seconds = payload
        forgot = r["acc_forget"] < orig["acc_forget"]
        kept = abs(r["acc_test"] - orig["acc_test"]) <= 0.05
        if method == "none":
            return line(label, kind, r, seconds, "(baseline)"), False
        if forgot and kept:
            return line(label, kind, r, seconds, "pass"), False
        result = "FAIL: " + ", ".join(w for w, bad in (("forget acc not lowered", not forgot),
                                                        ("test acc moved > 5 points", not kept)) if bad)
        return line(label, kind, r, seconds, result), True

    print(line("original", "", orig, 0.0, ""))
    print(line("retrain (ref)", "", ref, ref_seconds, ""), flush=True)
    failures: list[str] = []
    done: dict[int, str] = {}
    shown = 0
    pool = Pool(min(args.jobs, len(rows)), args, folder, device)
    try:
        for index, status, payload in pool.run(rows, args.row_timeout):
            text, failed = outcome(rows[index], status, payload)
            done[index] = text
            if failed:
                failures.append(rows[index][0])
            while shown in done:  # table order: print every row whose predecessors are all printed
                print(done.pop(shown), flush=True)
                shown += 1
    finally:
        pool.close()
    print()
    for label, kind, method, params in rows:
        if kind == "tuned":
            print(f"# {label}: {method} {validate_params(method, params).model_dump()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
