"""Scaling: the same experiment on 1 vs 2 workers (threads, processes) and on a local 2-worker Ray cluster.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scaling.py [--quick] [--runners threads,processes,ray] [--set K=V]

Every run is the experiment flow (`configured(cfg)`) in a fresh run folder (nothing cached), in this one
process, after the embedded Prefect server has been started by a trivial flow (not counted). A worker
count of w gives each worker cores // w torch threads (flows/runners.py), so "1 worker" is one task at a
time using every core, "2 workers" two tasks at once with one thread each. The Ray run starts its own
local Ray instance (2 CPUs, i.e. 2 workers) inside the flow, so its wall time includes Ray's start.
Prints each wall time and its ratio to threads x 1 (speed-up: above 1 is faster), and threads x 1 /
threads x 2 etc. side by side; steps.parquet must be the same for all runs except timings.
Grid: as bench/overhead.py (the default experiment; --quick: one seed, two proxies, two steps,
10 training epochs).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import QUICK, bench_config, describe, run_flow, same_rows, warm_server  # noqa: E402

from rumflow.flows.runners import cores  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a reduced grid: " + ", ".join(QUICK))
    ap.add_argument("--runners", default="threads,processes,ray",
                    help="comma-separated: threads and processes run with 1 and 2 workers, ray with 2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the grid")
    ap.add_argument("--out", default=None, help="parent of the run folders (default: a temporary folder)")
    args = ap.parse_args()

    kinds = [k.strip() for k in args.runners.split(",") if k.strip()]
    plan = [(k, w) for k in kinds for w in ((2,) if k == "ray" else (1, 2))]
    if ("threads", 1) not in plan:
        plan.insert(0, ("threads", 1))  # the baseline of every ratio
    print(f"grid: {describe(bench_config(args.quick, args.set))}")
    print(f"cores {cores()}; load average {os.getloadavg()[0]:.2f}")
    print(f"embedded Prefect server start (not counted): {warm_server():.1f} s", flush=True)
    root = Path(args.out or tempfile.mkdtemp(prefix="rumflow-bench-scaling-"))
    times: dict[tuple[str, int], float] = {}
    folders: dict[tuple[str, int], Path] = {}
    for kind, workers in plan:
        cfg = bench_config(args.quick, args.set, kind=kind, workers=workers)
        times[(kind, workers)], folders[(kind, workers)] = run_flow(cfg, root / f"{kind}-{workers}")
        print(f"  {kind} x {workers}: {times[(kind, workers)]:.1f} s (load average {os.getloadavg()[0]:.2f})",
              flush=True)
    base = times[("threads", 1)]
    groups = result_groups(folders)
    print(f"\n{'runner':<10} {'workers':>7} {'torch thr':>9} {'wall s':>8} {'threads x1 / this':>18} {'rows':>5}")
    for kind, workers in plan:
        t = times[(kind, workers)]
        print(f"{kind:<10} {workers:>7} {max(1, cores() // workers):>9} {t:>8.1f} {base / t:>18.2f} "
              f"{groups[(kind, workers)]:>5}")
    pairs = [f"{k} x1 / x2 = {times[(k, 1)] / times[(k, 2)]:.2f}" for k in kinds if (k, 1) in times and (k, 2) in times]
    if ("ray", 2) in times:
        pairs.append(f"threads x1 / ray x2 = {base / times[('ray', 2)]:.2f}")
        if ("threads", 2) in times:
            pairs.append(f"threads x2 / ray x2 = {times[('threads', 2)] / times[('ray', 2)]:.2f}")
    print("; ".join(pairs))
    n = len(set(groups.values()))
    print(("steps.parquet equal across all runs (timings aside)" if n == 1 else
           f"steps.parquet: {n} different results (rows column: runs with the same letter are equal, timings "
           "aside; CPU results depend on the torch threads per task, cores // workers)")
          + f"; load average {os.getloadavg()[0]:.2f}; run folders under {root}")


def result_groups(folders: dict[tuple[str, int], Path]) -> dict[tuple[str, int], str]:
    """A letter per run: runs whose steps.parquet are equal (timings aside) share it."""
    reps: list[tuple[str, Path]] = []
    out = {}
    for key, folder in folders.items():
        for letter, rep in reps:
            try:
                same_rows(folder, rep)
            except AssertionError:
                continue
            out[key] = letter
            break
        else:
            reps.append((letter := "ABCDEFGH"[len(reps)], folder))
            out[key] = letter
    return out


if __name__ == "__main__":
    sys.exit(main())
