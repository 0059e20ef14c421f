"""Benchmark every unlearning method against the retrain reference, at the document's settings and at
settings that work on the data set.

    python bench/methods.py                                   # digits, both settings, every method
    python bench/methods.py --settings tuned --methods scrub salun
    python bench/methods.py --data mnist --root data/mnist --model lenet_bn --epochs 4 --per-tier 1000 \\
        --settings tuned --config methods/mnist.yaml

Trains the original model (seed, the original recipe) recording the learning-event proxies, takes one
forget request of 3 x per-tier examples (the low / mid / high `confidence` tiers, disjoint), retrains the
reference on D_train minus that request, then runs every method on a copy of the original:
- `document` rows use each method's registered defaults (the source document's values);
- `tuned` rows use the data set's settings file (methods/<data>.yaml; a row may name its method with
  `method:`, so one method can appear twice).
Each row prints forget / retain / test accuracy, ToW and ToW-MIA against the reference, NoMUS, and RTE
(wall seconds including the method's preparation / retrain seconds). A method passes when it lowers
forget accuracy below the original's while keeping test accuracy within 5 points of it.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

from rumflow.config import EvaluateConfig
from rumflow.data import load_dataset
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


def rows_of(args: argparse.Namespace) -> list[tuple[str, str, str, object]]:
    """(label, settings kind, method, validated params) for every row asked for."""
    rows = []
    if args.settings in ("document", "both"):
        rows += [(n, "document", n, validate_params(n, {})) for n in sorted(METHODS) if n != "retrain"]
    if args.settings in ("tuned", "both"):
        path = Path(args.config or ROOT / "methods" / f"{args.data}.yaml")
        entries = yaml.safe_load(path.read_text()) or {} if path.is_file() else {}
        for label, entry in entries.items():
            if label == "experiment":  # the default experiment's tier settings, not a table row
                continue
            entry = dict(entry or {})
            method = entry.pop("method", label)
            rows.append((label, "tuned", method, validate_params(method, entry)))
    if args.methods:
        rows = [r for r in rows if r[0] in args.methods or r[2] in args.methods]
    return rows


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
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = stable timings on a shared box)")
    ap.add_argument("--methods", nargs="*", help="only these rows (labels or method names)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        rows = rows_of(args)
    except RumflowError as exc:
        ap.error(str(exc))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = load_dataset(args.data, args.root).to(device)
    spec = ModelSpec(args.model, ds.num_classes, ds.in_channels, ds.mean, ds.std)
    recipe = Recipe(epochs=args.epochs, lr=0.1, batch_size=args.batch_size)

    original = create_model(spec, seed=args.seed).to(device)
    trained = train_model(original, ds.train, recipe, seed=args.seed, record_events=True)
    conf = trained.events[:, LEARNING_EVENTS.index("confidence")].cpu().numpy()
    tiers = select_tiers(ds.train.ids(), memorization_of("confidence", conf), args.per_tier)
    plan = StepPlan(step=1, before=[], **tiers)
    forget, retain = ds.train.take(plan.mix), ds.train.drop(plan.mix)
    evaluate_cfg = EvaluateConfig()

    def ctx() -> UnlearnContext:
        return UnlearnContext(seed=args.seed, recipe=recipe, val=ds.val,
                              fresh_model=lambda: create_model(spec, seed=args.seed).to(device))

    def timed(name: str, p) -> tuple[torch.nn.Module, float]:
        model = copy.deepcopy(original)
        sync(device)
        start = time.perf_counter()
        out = run_method(name, p, model, forget, retain, ctx())
        sync(device)
        return out, time.perf_counter() - start

    def measure(model: torch.nn.Module) -> dict[str, float]:
        return evaluate_model(model, ds, plan, evaluate_cfg, args.seed)

    ref_model, ref_seconds = timed("retrain", validate_params("retrain", {}))
    ref, orig = measure(ref_model), measure(original)

    print(f"# {args.data}, {args.model}, {len(ds.train)} train / {len(ds.test)} test, forget {len(forget)} "
          f"(confidence tiers low/mid/high x {args.per_tier}), seed {args.seed}, original recipe "
          f"{args.epochs} epochs lr 0.1 batch {args.batch_size}")
    print(f"# {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); settings: {args.settings}")
    print(f"# original trained in {trained.seconds:.1f} s; retrain reference in {ref_seconds:.1f} s")
    head = (f"{'method':<34}{'settings':>9}{'forget':>8}{'retain':>8}{'test':>7}{'ToW':>7}{'ToW-MIA':>8}"
            f"{'NoMUS':>7}{'sec':>8}{'RTE':>7}  result")
    print(head)
    print("-" * len(head))

    def line(name: str, kind: str, r: dict, seconds: float, result: str) -> None:
        t = float(tow(r["acc_forget"], r["acc_retain"], r["acc_test"], ref["acc_forget"], ref["acc_retain"],
                      ref["acc_test"]))
        tm = float(tow_mia(r["mia"], r["acc_retain"], r["acc_test"], ref["mia"], ref["acc_retain"],
                           ref["acc_test"]))
        print(f"{name:<34}{kind:>9}{r['acc_forget']:>8.3f}{r['acc_retain']:>8.3f}{r['acc_test']:>7.3f}{t:>7.3f}"
              f"{tm:>8.3f}{r.get('nomus', float('nan')):>7.3f}{seconds:>8.2f}{seconds / ref_seconds:>7.3f}  "
              f"{result}")

    line("original", "", orig, 0.0, "")
    line("retrain (ref)", "", ref, ref_seconds, "")
    failures = []
    for label, kind, method, p in rows:
        try:
            model, seconds = timed(method, p)
        except DivergenceError as exc:
            print(f"{label:<34}{kind:>9}  DIVERGED: {exc}")
            failures.append(label)
            continue
        r = measure(model)
        forgot = r["acc_forget"] < orig["acc_forget"]
        kept = abs(r["acc_test"] - orig["acc_test"]) <= 0.05
        if method == "none":
            result = "(baseline)"
        elif forgot and kept:
            result = "pass"
        else:
            result = "FAIL: " + ", ".join(w for w, bad in (("forget acc not lowered", not forgot),
                                                            ("test acc moved > 5 points", not kept)) if bad)
            failures.append(label)
        line(label, kind, r, seconds, result)
    print()
    for label, kind, method, p in rows:
        if kind == "tuned":
            print(f"# {label}: {method} {p.model_dump()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
