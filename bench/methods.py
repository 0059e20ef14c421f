"""Benchmark every unlearning method on digits against the retrain reference.

    .venv/bin/python bench/methods.py                      # hyperparameters from methods/digits.yaml
    .venv/bin/python bench/methods.py --defaults           # the registered (SPEC / RUM) defaults instead

Trains the original small CNN (Recipe(30, 0.1, 128), seed 0) recording the learning-event proxies, takes
a 60-example forget set (the low / mid / high memorization tiers of the `confidence` proxy, 20 each,
disjoint), retrains the reference on D_train minus that set, then runs every other method on a copy of
the original and prints forget / retain / test accuracy, ToW against the reference, wall seconds and
seconds / retrain seconds (RTE). A method passes when it lowers forget accuracy below the original's while
keeping test accuracy within 5 points of it.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from rumflow.data import load_dataset
from rumflow.errors import DivergenceError
from rumflow.methods import METHODS, UnlearnContext, run_method, validate_params
from rumflow.metrics import tow
from rumflow.models import ModelSpec, create_model
from rumflow.planning import select_tiers
from rumflow.proxies.learning_events import LEARNING_EVENTS
from rumflow.proxies.registry import memorization_of
from rumflow.training import Recipe, accuracy, sync, train_model

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "methods" / "digits.yaml"),
                    help="YAML mapping method -> hyperparameters (the digits-tuned values)")
    ap.add_argument("--defaults", action="store_true", help="use every method's registered defaults instead")
    ap.add_argument("--per-tier", type=int, default=20, help="forget examples per tier (3 tiers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = stable timings on a shared box)")
    ap.add_argument("--methods", nargs="*", help="only these rows of the config (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    # rows: label -> (method, validated params); a YAML entry may name its method (`method: neggrad_plus`)
    # so that one method can appear twice (e.g. both neggrad_plus variants)
    if args.defaults:
        entries = {n: {} for n in METHODS if n != "retrain"}
    else:
        entries = yaml.safe_load(Path(args.config).read_text()) or {}
    rows = {}
    for label, entry in entries.items():
        entry = dict(entry or {})
        method = entry.pop("method", label)
        rows[label] = (method, validate_params(method, entry))
    if args.methods:
        unknown = sorted(set(args.methods) - set(rows))
        if unknown:
            ap.error(f"no row named {', '.join(unknown)}; rows: {', '.join(rows)}")
        rows = {k: v for k, v in rows.items() if k in args.methods}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = load_dataset("digits").to(device)
    spec = ModelSpec("small_cnn", ds.num_classes, ds.in_channels, ds.mean, ds.std)
    recipe = Recipe(epochs=30, lr=0.1, batch_size=128)

    original = create_model(spec, seed=args.seed).to(device)
    trained = train_model(original, ds.train, recipe, seed=args.seed, record_events=True)
    conf = trained.events[:, LEARNING_EVENTS.index("confidence")].cpu().numpy()
    tier_ids = {k: np.asarray(v) for k, v in select_tiers(ds.train.ids(), memorization_of("confidence", conf),
                                                          args.per_tier).items()}
    forget_ids = np.concatenate(list(tier_ids.values()))
    forget, retain = ds.train.take(forget_ids), ds.train.drop(forget_ids)
    tier_splits = {t: ds.train.take(i) for t, i in tier_ids.items()}

    def ctx() -> UnlearnContext:
        return UnlearnContext(seed=args.seed, recipe=recipe,
                              fresh_model=lambda: create_model(spec, seed=args.seed))

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        row = {"forget": accuracy(model, forget), "retain": accuracy(model, retain), "test": accuracy(model, ds.test)}
        row.update({f"f_{t}": accuracy(model, s) for t, s in tier_splits.items()})
        return row

    def timed(name: str, p) -> tuple[torch.nn.Module, float]:
        model = copy.deepcopy(original)
        sync(device)
        start = time.perf_counter()
        out = run_method(name, p, model, forget, retain, ctx())
        sync(device)
        return out, time.perf_counter() - start

    ref_model, ref_seconds = timed("retrain", validate_params("retrain", {}))
    ref = evaluate(ref_model)
    orig = evaluate(original)

    print(f"# digits, small_cnn, {len(ds.train)} train / {len(ds.test)} test, forget {len(forget)} "
          f"(confidence tiers low/mid/high x {args.per_tier}), seed {args.seed}")
    print(f"# {device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); hyperparameters: "
          f"{'registered defaults' if args.defaults else Path(args.config).name}")
    print(f"# original trained in {trained.seconds:.1f} s; retrain reference in {ref_seconds:.1f} s")
    head = (f"{'method':<20}{'forget':>8}{'f_low':>7}{'f_mid':>7}{'f_high':>7}{'retain':>8}{'test':>7}"
            f"{'ToW':>7}{'sec':>7}{'RTE':>7}  result")
    print(head)
    print("-" * len(head))

    def line(name: str, r: dict, seconds: float, result: str) -> None:
        t = float(tow(r["forget"], r["retain"], r["test"], ref["forget"], ref["retain"], ref["test"]))
        print(f"{name:<20}{r['forget']:>8.3f}{r['f_low']:>7.2f}{r['f_mid']:>7.2f}{r['f_high']:>7.2f}"
              f"{r['retain']:>8.3f}{r['test']:>7.3f}{t:>7.3f}{seconds:>7.2f}{seconds / ref_seconds:>7.3f}  {result}")

    line("original", orig, 0.0, "")
    line("retrain (ref)", ref, ref_seconds, "")
    failures = []
    for name, (method, p) in rows.items():
        try:
            model, seconds = timed(method, p)
        except DivergenceError as exc:
            print(f"{name:<20}  DIVERGED: {exc}")
            failures.append(name)
            continue
        r = evaluate(model)
        forgot = r["forget"] < orig["forget"]
        kept = abs(r["test"] - orig["test"]) <= 0.05
        if method == "none":
            result = "(baseline)"
        elif forgot and kept:
            result = "pass"
        else:
            result = "FAIL: " + ", ".join(w for w, bad in (("forget acc not lowered", not forgot),
                                                            ("test acc moved > 5 points", not kept)) if bad)
            failures.append(name)
        line(name, r, seconds, result)
    print()
    for name, (method, p) in rows.items():
        print(f"# {name}: {method} {p.model_dump()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
