"""Prefect's overhead: the experiment's work through the flow vs the same task functions in a plain loop.

    OMP_NUM_THREADS=1 .venv/bin/python bench/overhead.py [--quick] [--repeats N] [--set KEY=VALUE ...]

Both arms run in this one process, each in a fresh run folder, on the same grid (printed first):
  flow: the experiment flow (`configured(cfg)`) on the threads runner with ONE worker, so that both arms
        do the work one task at a time, in one worker thread, with the same torch threads
        (--torch-threads, default 1); the embedded Prefect server is
        started (and timed) before, by a trivial flow, so neither arm pays for it;
  loop: every task the flow submits, in the same order, called as `task.fn(...)` (no Prefect: no task
        engine, no cache lookups, no result records, no API calls), then the same rows, Parquet files,
        report and manifest.
It prints both wall times and flow / loop (the goal is at most 1.03), and checks that both arms wrote the
same steps.parquet except the timing columns (so the loop really did the flow's work). For each arm it
also prints the task bodies' wall and CPU seconds (inside each task's compute slot, the same computations
in both arms): the CPU seconds show how fast the machine ran that arm (shared cores drift by several per
cent between arms), wall minus CPU inside the bodies is what they waited for (the GIL, the cores), and
the arm's wall minus its bodies' wall is the orchestration around them (one worker: bodies never
overlap). "speed-adjusted" divides each arm's wall by its bodies' CPU seconds before taking the ratio.
--profile runs the flow arm once under a stack sampler instead and prints where the busy time goes.
Default grid: the default experiment (`rumflow run` with no config). --quick: one seed, two proxies
(confidence, holdout_retraining), two steps, 10 training epochs (a few minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

BENCH_HOME = tempfile.mkdtemp(prefix="rumflow-bench-prefect-")
# Prefect reads its settings at import: isolate them before anything imports it.
os.environ.setdefault("PREFECT_HOME", BENCH_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pandas as pd  # noqa: E402

from rumflow.config import ExperimentConfig, apply_override, validate_config  # noqa: E402

QUICK = ["seeds=[0]", "proxies=[confidence,holdout_retraining]", "forget.steps=2", "train.epochs=10"]
TIME = {"seconds", "seconds_step", "retrain_seconds", "rte", "rte_step", "host", "efficient"}


def bench_config(quick: bool, overrides: list[str], **runner: Any) -> ExperimentConfig:
    """The benchmark's grid: the default experiment, or the --quick one, plus --set overrides."""
    data: dict[str, Any] = {"name": "bench", "device": "cpu"}
    for assignment in (QUICK if quick else []) + overrides:
        apply_override(data, assignment)
    data["runner"] = {"kind": "threads", **runner}
    return validate_config(data)


def describe(cfg: ExperimentConfig) -> str:
    """One line saying what the grid runs."""
    rum = "/".join(getattr(cfg.rum, t).method for t in ("low", "mid", "high"))
    return (f"seeds {cfg.seeds}; proxies {cfg.proxies}; {cfg.forget.steps} steps x {cfg.forget.per_tier} per tier; "
            f"train {cfg.train.epochs} epochs; RUM {rum}; vanilla {cfg.vanilla.method}; "
            f"memorization {'on' if cfg.memorization.estimate or 'memorization' in cfg.proxies else 'off'}; "
            f"forgetting quality N={cfg.evaluate.forgetting_quality.models}; device {cfg.device}")


def warm_server() -> float:
    """Start the embedded Prefect server (a trivial flow run); its seconds."""
    from prefect import flow

    @flow(name="rumflow-bench-warmup")
    def warmup() -> int:
        return 1

    start = time.perf_counter()
    warmup()
    return time.perf_counter() - start


def run_flow(cfg: ExperimentConfig, out: Path, threads: int | None = None) -> tuple[float, Path]:
    """The experiment flow on cfg's runner (its tasks on `threads` torch threads when given, else the
    runner's own share of the cores); (wall seconds, run folder)."""
    import torch

    from rumflow.flows.experiment import configured

    start = time.perf_counter()
    flow_fn = configured(cfg)  # sets RUMFLOW_TORCH_THREADS, which every task reads (settle_threads)
    if threads:
        os.environ["RUMFLOW_TORCH_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    state = flow_fn(cfg, out=str(out), return_state=True)
    seconds = time.perf_counter() - start
    if not state.is_completed():
        raise SystemExit(f"the flow did not complete: {state}")
    return seconds, Path(state.result())


class BodyClock:
    """Wall and CPU seconds of every task body (inside its compute slot), summed over one arm."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.calls = 0
        self.lock = threading.Lock()

    def install(self) -> None:
        """Wrap rumflow.tasks.compute.compute_slot (in_compute_slot looks it up at every call)."""
        from contextlib import contextmanager

        from rumflow.tasks import compute

        inner = compute.compute_slot

        @contextmanager
        def timed():
            with inner():
                wall, cpu = time.perf_counter(), time.thread_time()
                try:
                    yield
                finally:
                    with self.lock:
                        self.wall += time.perf_counter() - wall
                        self.cpu += time.thread_time() - cpu
                        self.calls += 1

        compute.compute_slot = timed

    def reset(self) -> tuple[float, float, int]:
        """(wall, cpu, calls) since the last reset; starts over."""
        with self.lock:
            out = (self.wall, self.cpu, self.calls)
            self.wall = self.cpu = 0.0
            self.calls = 0
        return out


class Done:
    """A finished call, shaped like the PrefectFuture the flow's helpers read (.result(), .state.name)."""

    class _State:
        name = "Completed"

    state = _State()

    def __init__(self, value: Any):
        self.value = value

    def result(self) -> Any:
        return self.value


def _plain(value: Any) -> Any:
    """A task argument with Done values unwrapped (lists too: forgetting quality takes lists of models)."""
    if isinstance(value, Done):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def loop_submitter(cfg: ExperimentConfig, run_dir: Path):
    """The flow's Submitter, but each 'submit' calls the plain task function at once (no Prefect)."""
    from rumflow.flows.experiment import Submitter
    from rumflow.tasks.work import (evaluate_task, forgetting_quality_task, memorization_task, plan_task,
                                    prepare_task, proxy_task, train_task, unlearn_task)

    class Loop(Submitter):
        def __init__(self) -> None:  # no result storage block, no API
            self.cfg, self.workdir, self.futures = cfg, str(run_dir), []
            self.tasks = {t.name: t for t in (train_task, proxy_task, memorization_task, plan_task, prepare_task,
                                              unlearn_task, evaluate_task, forgetting_quality_task)}

        def submit(self, name: str, label: str, **params: Any) -> Done:
            done = Done(self.tasks[name].fn(**{k: _plain(v) for k, v in params.items()}, label=label))
            self.futures.append(done)
            return done

    return Loop()


def run_loop(cfg: ExperimentConfig, out: Path, threads: int) -> tuple[float, Path]:
    """The flow's work as plain calls in one worker thread (as the flow's one-worker runner runs them, so
    torch's per-thread settings match), in the flow's submission order, then its outputs."""
    from concurrent.futures import ThreadPoolExecutor

    os.environ["RUMFLOW_TORCH_THREADS"] = str(threads)  # every task settles its thread count from it
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_loop, cfg, out).result()


def _loop(cfg: ExperimentConfig, out: Path) -> tuple[float, Path]:
    """The body of run_loop; (seconds, run folder)."""
    from rumflow import records
    from rumflow.artifacts import runfolder
    from rumflow.config import dump_config
    from rumflow.flows import experiment as ex
    from rumflow.proxies.registry import PROXIES
    from rumflow.runtime import check_feasible, dataset_on
    from rumflow.tasks.refs import ChainRecord
    from rumflow.tasks.report import report_task, table_digests

    start = time.perf_counter()
    run_dir = out.expanduser().resolve() / cfg.name
    check_feasible(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with runfolder.hold(run_dir, cfg.digest(), cfg.name):
        runfolder.mark_incomplete(run_dir)
        s, base = loop_submitter(cfg, run_dir), records.provenance(cfg)
        # the same calls as flows/experiment.py's flow and subflows, step by step
        truth = None
        if cfg.memorization.estimate or "memorization" in cfg.proxies:
            truth = s.submit("memorization", f"R{cfg.memorization.models}", data=cfg.data, model=cfg.model,
                             train=cfg.train, memorization=cfg.memorization, device=cfg.device, workdir=s.workdir)
        originals, scores = {}, {}
        for seed in cfg.seeds:
            originals[seed] = s.train(seed, None, f"s{seed}/original", events=True)
            scores[seed] = {p: (truth if PROXIES[p].source == "memorization" else
                                s.scores(p, seed, originals[seed], originals[seed], f"s{seed}/{p}"))
                            for p in cfg.proxies}
        chains = {(seed, p): ex.Chain(seed, p, originals[seed], scores[seed][p], originals[seed], originals[seed])
                  for seed in cfg.seeds for p in cfg.proxies}
        steps = [ex.submit_step(s, chain, k) for k in range(1, cfg.forget.steps + 1) for chain in chains.values()]
        fq = []
        if cfg.evaluate.forgetting_quality.models:
            first = cfg.seeds[0]
            fq = ex.submit_forgetting_quality(s, first, originals,
                                              {p: chains[(first, p)].plans[0] for p in cfg.proxies})
        n_train = len(dataset_on(cfg.data, cfg.device).train)
        rows = [row for step in steps for row in ex.build_rows(cfg, base, step, n_train)]
        done = {key: ChainRecord(rows=[], plans=[f.result() for f in c.plans], models=[],
                                 recomputed=[(k, f.result()) for k, f in c.recomputed]) for key, c in chains.items()}
        outputs = ex.write_outputs(cfg, run_dir, base, rows, originals, scores, done, truth, fq)
        report = report_task.fn(tables=table_digests(run_dir, outputs), workdir=s.workdir)
        outputs += [run_dir / rel for rel in report.files]
        runfolder.finish(run_dir, dump_config(cfg), outputs, cfg.digest())
    return time.perf_counter() - start, run_dir


IDLE = {("threading.py", "wait"), ("threading.py", "_wait_for_tstate_lock"), ("queue.py", "get"),
        ("selectors.py", "select"), ("thread.py", "_worker"), ("threading.py", "acquire"),
        ("flow_engine.py", "heartbeat_loop")}  # it sleeps in time.sleep, which leaves no Python frame


class Sampler(threading.Thread):
    """Where the busy threads are: every `interval` s, each other thread's stack is classified as torch
    (compute), prefect (innermost Prefect function: engine, client, hashing, records), rumflow or other;
    waiting threads (locks, queues, an idle event loop) are not counted."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True, name="rumflow-bench-sampler")
        self.interval, self.halt, self.ticks = interval, threading.Event(), 0
        self.counts: Counter[str] = Counter()

    def run(self) -> None:
        me = threading.get_ident()
        while not self.halt.wait(self.interval):
            self.ticks += 1
            for tid, frame in sys._current_frames().items():
                if tid != me:
                    label = self.label(frame)
                    if label:
                        self.counts[label] += 1

    @staticmethod
    def label(frame: Any) -> str | None:
        """The class of one sample (None: the thread is waiting)."""
        if (Path(frame.f_code.co_filename).name, frame.f_code.co_name) in IDLE:
            return None
        innermost = None  # the innermost Prefect or rumflow frame decides (rumflow code inside a task is
        f = frame         # rumflow's, not the task engine's that called it)
        while f is not None:
            path = f.f_code.co_filename
            if "/torch/" in path:
                return "torch (task compute)"
            if innermost is None and "/prefect/" in path:
                innermost = f"prefect: {Path(path).parent.name}/{Path(path).name}:{f.f_code.co_name}"
            elif innermost is None and "/site-packages/" not in path and "/work/main/" in path:
                innermost = f"rumflow: {Path(path).name}:{f.f_code.co_name}"
            f = f.f_back
        return innermost or f"other: {Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"


def profile_flow(cfg: ExperimentConfig, root: Path, threads: int, top: int = 25) -> None:
    """One flow run under the sampler; prints the busy time by class and the top Prefect functions."""
    sampler = Sampler()
    sampler.start()
    seconds, _ = run_flow(cfg, root / "profiled", threads)
    sampler.halt.set()
    sampler.join()
    tick = seconds / max(sampler.ticks, 1)
    kinds: Counter[str] = Counter()
    for label, n in sampler.counts.items():
        kinds[label.split(":")[0]] += n
    print(f"profiled flow: {seconds:.1f} s wall; busy thread-seconds by class (all threads of this process; "
          f"the embedded server is another process):")
    for kind, n in kinds.most_common():
        print(f"  {kind:<22} {n * tick:7.1f} s")
    print(f"top {top} busy places outside torch:")
    for label, n in [(k, v) for k, v in sampler.counts.most_common() if not k.startswith("torch")][:top]:
        print(f"  {n * tick:6.1f} s  {label}")


def same_rows(a: Path, b: Path) -> int:
    """Assert both run folders hold the same steps.parquet except timings; the number of rows."""
    da, db = pd.read_parquet(a / "steps.parquet"), pd.read_parquet(b / "steps.parquet")
    keep = [c for c in da.columns if c not in TIME]
    pd.testing.assert_frame_equal(da[keep], db[keep])
    return len(da)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a reduced grid: " + ", ".join(QUICK))
    ap.add_argument("--repeats", type=int, default=1, help="flow/loop pairs, alternating which goes first")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the grid")
    ap.add_argument("--out", default=None, help="parent of the run folders (default: a temporary folder)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="intra-op threads of every task in both arms (default 1: steady on shared cores)")
    ap.add_argument("--profile", action="store_true",
                    help="instead: one flow run under a stack sampler, printing where its busy time goes")
    args = ap.parse_args()

    from rumflow.flows.runners import cores

    cfg = bench_config(args.quick, args.set, workers=1)
    threads = args.torch_threads
    print(f"grid: {describe(cfg)}")
    print(f"cores {cores()}; torch threads {threads} in both arms; flow runner threads x 1 worker; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"embedded Prefect server start (not counted): {warm_server():.1f} s", flush=True)
    root = Path(args.out or tempfile.mkdtemp(prefix="rumflow-bench-overhead-"))
    if args.profile:
        profile_flow(cfg, root, threads)
        return
    clock = BodyClock()
    clock.install()
    ratios, adjusted = [], []
    for r in range(args.repeats):
        bodies: dict[str, tuple[float, float, int]] = {}
        times: dict[str, float] = {}
        folders: dict[str, Path] = {}
        for arm in (("flow", "loop") if r % 2 == 0 else ("loop", "flow")):
            fn = run_flow if arm == "flow" else run_loop
            clock.reset()
            times[arm], folders[arm] = fn(cfg, root / f"{arm}-{r}", threads)
            bodies[arm] = wall, cpu, calls = clock.reset()
            print(f"  repeat {r + 1} {arm}: {times[arm]:.1f} s; {calls} task bodies: wall {wall:.1f} s, CPU "
                  f"{cpu:.1f} s (waited {wall - cpu:.1f} s); around the bodies {times[arm] - wall:.1f} s",
                  flush=True)
        n = same_rows(folders["flow"], folders["loop"])
        ratios.append(times["flow"] / times["loop"])
        adjusted.append(ratios[-1] * bodies["loop"][1] / bodies["flow"][1])
        print(f"repeat {r + 1}: flow {times['flow']:.1f} s | loop {times['loop']:.1f} s | flow/loop "
              f"{ratios[-1]:.3f} (speed-adjusted {adjusted[-1]:.3f}) | steps.parquet equal ({n} rows, timings "
              f"aside) | load average {os.getloadavg()[0]:.2f}", flush=True)
    verdict = "meets" if statistics.median(ratios) <= 1.03 else "misses"
    print(f"median flow/loop {statistics.median(ratios):.3f} over {len(ratios)} repeat(s) ({verdict} the goal "
          f"<= 1.03); speed-adjusted median {statistics.median(adjusted):.3f}; run folders under {root}")


if __name__ == "__main__":
    sys.exit(main())
