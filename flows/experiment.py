"""The experiment flow: train -> proxies -> K steps of RUM and vanilla unlearning -> retrain -> Parquet."""
from __future__ import annotations

import contextvars
import json
import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import pandas as pd
import torch
from prefect import flow, get_run_logger

import rumflow
from rumflow.artifacts.checkpoints import CheckpointRef
from rumflow.artifacts.tables import write_parquet, write_text
from rumflow.config import ExperimentConfig, MethodSpec, dump_config, validate_config
from rumflow.artifacts.prefect_artifacts import advance_progress, publish_step_table, publish_summary, start_progress
from rumflow.artifacts.report import build_report
from rumflow.metrics import add_derived_columns, tow
from rumflow.planning import TIERS, StepPlan, plan_step
from rumflow.proxies.registry import PROXIES, memorization_of
from rumflow.runtime import check_feasible, dataset_on
from rumflow.tasks.caching import ensure, in_run_dir
from rumflow.methods.registry import get_method
from rumflow.tasks.work import (Scores, prepare_task, Trained, evaluate_task, forgetting_quality_task,
                                memorization_task, proxy_task, train_task, unlearn_task)
from rumflow.training import resolve_device

T = TypeVar("T")


@dataclass
class Run:
    """What every chain of one experiment shares: the config, its tasks bound to the run folder, progress."""

    cfg: ExperimentConfig
    run_dir: Path
    device: str

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.ids = dataset_on(self.cfg.data, self.device).train.ids()
        self.train = in_run_dir(train_task, self.run_dir)
        self.proxy = in_run_dir(proxy_task, self.run_dir)
        self.unlearn = in_run_dir(unlearn_task, self.run_dir)
        self.evaluate = in_run_dir(evaluate_task, self.run_dir)
        self.provenance = {"run": self.cfg.name, "config_sha": self.cfg.digest(),
                           "rumflow_version": rumflow.__version__, "torch_version": torch.__version__,
                           "device": str(resolve_device(self.device)), "host": platform.node()}

    def start_progress(self) -> None:
        self.total = len(self.cfg.seeds) * len(self.cfg.proxies) * self.cfg.forget.steps
        self.done = 0
        self.progress_id = start_progress(self.cfg.name, self.total,
                                          f"{self.total} chain steps (seeds x proxies x steps)")

    def advance(self) -> None:
        with self.lock:
            self.done += 1
            advance_progress(self.progress_id, self.done, self.total)

    @property
    def workdir(self) -> str:
        return str(self.run_dir)

    def train_model(self, seed: int, exclude: list[int], record_events: bool = False) -> Trained:
        c = self.cfg
        return ensure(self.train, c.data, c.model, c.train, seed, exclude, record_events, self.device,
                      self.workdir, n_excluded=len(exclude))

    def scores(self, proxy: str, seed: int, trained: Trained, ckpt: CheckpointRef) -> Scores:
        c = self.cfg
        if PROXIES[proxy].source == "memorization":
            return self.memorization()
        return ensure(self.proxy, proxy, trained, ckpt, c.data, c.model, c.holdout, seed, self.device,
                      self.workdir)

    def memorization(self) -> Scores:
        """The true-memorization estimate: one per data/model/recipe, shared by every seed."""
        c = self.cfg
        return ensure(in_run_dir(memorization_task, self.run_dir), c.data, c.model, c.train, c.memorization,
                      self.device, self.workdir)

    def unlearn_step(self, parent: CheckpointRef, plan: StepPlan, stage: str, spec: MethodSpec, seed: int):
        c = self.cfg
        exclude = plan.excluded_from_retain(stage, c.forget.retain_policy)
        prep = get_method(spec.method).prepare
        prepared = None
        if prep is not None:
            prepared = ensure(in_run_dir(prepare_task, self.run_dir), parent, plan.tier(stage),
                              exclude if prep.uses_retain else None, spec, seed if prep.uses_seed else None,
                              c.data, c.model, c.train, self.device, self.workdir).ckpt
        return ensure(self.unlearn, parent, plan.tier(stage), exclude, spec, seed, c.data, c.model, c.train,
                      self.device, self.workdir, prepared=prepared)

    def metrics(self, ckpt: CheckpointRef, plan: StepPlan, seed: int) -> dict[str, Any]:
        c = self.cfg
        return self.evaluate(ckpt, plan, c.data, c.model, c.evaluate, seed, self.device)

    def record(self, seed: int, proxy: str, strategy: str, plan: StepPlan, stage: str, method: MethodSpec | str,
               ckpt: CheckpointRef, seconds: float, seconds_step: float, retrain_seconds: float,
               final: bool, step: int | None = None) -> dict[str, Any]:
        """Evaluate `ckpt` against `plan`: its steps.parquet row."""
        spec = method if isinstance(method, MethodSpec) else MethodSpec(method=method)
        row = {**self.provenance, "seed": seed, "proxy": proxy, "strategy": strategy,
               "step": plan.step if step is None else step, "stage": stage, "tier": stage, "final": final,
               "method": spec.method, "params": json.dumps(spec.params.model_dump(mode="json"), sort_keys=True),
               "checkpoint": ckpt.sha256, "seconds": seconds, "seconds_step": seconds_step,
               "retrain_seconds": retrain_seconds, "n_forget": len(plan.mix),
               "n_retain": len(self.ids) - len(plan.forgotten), "retain_policy": self.cfg.forget.retain_policy,
               **self.metrics(ckpt, plan, seed)}
        return row

    def memorization_of(self, proxy: str, scores: Scores) -> np.ndarray:
        """The proxy's scores in training-id order, oriented so that higher = more memorized."""
        return memorization_of(proxy, scores.load().set_index("example_id").loc[self.ids, "score"].to_numpy())


def unlearn_seed(seed: int, step: int, stage: str) -> int:
    """A distinct, reproducible seed for every unlearning call of a chain."""
    return seed * 100_003 + step * 101 + (TIERS + ("mix",)).index(stage)


@dataclass
class Chain:
    """What one (seed, proxy) chain produced."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    examples: list[pd.DataFrame] = field(default_factory=list)  # per-step recomputed scores
    forgotten: list[dict[str, Any]] = field(default_factory=list)
    first_plan: StepPlan | None = None


def run_chain(run: Run, seed: int, proxy: str, original: Trained, first: Scores) -> Chain:
    """K steps of RUM (low -> mid -> high) and vanilla from the original model, against retrain refs."""
    cfg, log, out = run.cfg, get_run_logger(), Chain()
    ids = run.ids
    rum = vanilla = original.ckpt
    before: list[int] = []
    mem = run.memorization_of(proxy, first)
    for k in range(1, cfg.forget.steps + 1):
        if k > 1 and proxy in cfg.recompute:
            scores = run.scores(proxy, seed, original, rum)
            out.examples.append(_scores_frame(seed, k, {proxy: scores}))
            mem = run.memorization_of(proxy, scores)
        plan = plan_step(k, ids, mem, before, cfg.forget.per_tier, PROXIES[proxy].mid_target)
        reference = run.train_model(seed, plan.forgotten)
        rs = reference.seconds
        rows = []
        if k == 1:
            out.first_plan = plan
            rows.append(run.record(seed, proxy, "original", plan, "mix", "none", original.ckpt, original.seconds,
                                   original.seconds, rs, True, step=0))
        ref_row = run.record(seed, proxy, "retrain", plan, "mix", "retrain", reference.ckpt, rs, rs, rs, True)
        rows.append(ref_row)
        step_seconds = 0.0
        for stage in TIERS:
            spec = getattr(cfg.rum, stage)
            done = run.unlearn_step(rum, plan, stage, spec, unlearn_seed(seed, k, stage))
            rum, step_seconds = done.ckpt, step_seconds + done.seconds
            rum_row = run.record(seed, proxy, "rum", plan, stage, spec, rum, done.seconds, step_seconds, rs,
                                 stage == TIERS[-1])
            rows.append(rum_row)
        done = run.unlearn_step(vanilla, plan, "mix", cfg.vanilla, unlearn_seed(seed, k, "mix"))
        vanilla = done.ckpt
        van_row = run.record(seed, proxy, "vanilla", plan, "mix", cfg.vanilla, vanilla, done.seconds,
                             done.seconds, rs, True)
        rows.append(van_row)
        log.info(f"seed {seed} | {proxy} | step {k}/{cfg.forget.steps}: ToW rum {_tow(rum_row, ref_row):.3f} "
                 f"vanilla {_tow(van_row, ref_row):.3f} | forget acc rum {rum_row['acc_forget']:.3f} "
                 f"vanilla {van_row['acc_forget']:.3f} retrain {ref_row['acc_forget']:.3f} | "
                 f"seconds rum {step_seconds:.1f} vanilla {done.seconds:.1f} retrain {rs:.1f}")
        publish_step_table(cfg.name, seed, proxy, k, add_derived_columns(pd.DataFrame(rows)).to_dict("records"))
        run.advance()
        out.rows += rows
        out.forgotten.extend({"seed": seed, "proxy": proxy, "example_id": i, "step": k, "tier": t}
                             for t in TIERS for i in plan.tier(t))
        before = plan.forgotten
    return out


def replica_seed(index: int) -> int:
    """Seeds of the forgetting-quality replicas, apart from the experiment's own seeds."""
    return 1_000_000 + index


def forgetting_quality_table(run: Run, original: Trained, seed: int, chains: dict[tuple[int, str], Chain]
                             ) -> pd.DataFrame:
    """Per proxy and strategy: F and the final score from N unlearned (the step-1 chain of `original`
    with N unlearning seeds) and N retrained models (N training seeds), at step 1."""
    cfg, n = run.cfg, run.cfg.evaluate.forgetting_quality.models
    task = in_run_dir(forgetting_quality_task, run.run_dir)
    rows = []
    workers = chain_workers(cfg, n)
    strategies = {"rum": [(stage, getattr(cfg.rum, stage)) for stage in TIERS], "vanilla": [("mix", cfg.vanilla)]}
    for proxy in cfg.proxies:
        plan = chains[(seed, proxy)].first_plan
        retrained = parallel(lambda i: run.train_model(replica_seed(i), plan.forgotten).ckpt,
                             [(i,) for i in range(n)], workers)
        for strategy, stages in strategies.items():
            def unlearned(i: int) -> CheckpointRef:
                ckpt = original.ckpt
                for stage, spec in stages:
                    ckpt = run.unlearn_step(ckpt, plan, stage, spec, unlearn_seed(replica_seed(i), 1, stage)).ckpt
                return ckpt

            models = parallel(unlearned, [(i,) for i in range(n)], workers)
            result = task(models, retrained, plan, cfg.data, cfg.model, run.device)
            rows.append({"run": cfg.name, "config_sha": run.provenance["config_sha"], "seed": seed,
                         "proxy": proxy, "strategy": strategy, "step": 1, "models": n, **result})
    return pd.DataFrame(rows)


def _tow(row: dict[str, Any], ref: dict[str, Any]) -> float:
    return float(tow(row["acc_forget"], row["acc_retain"], row["acc_test"],
                     ref["acc_forget"], ref["acc_retain"], ref["acc_test"]))


def _scores_frame(seed: int, step: int, scores: dict[str, Scores]) -> pd.DataFrame:
    """One examples.parquet block: the given proxies' scores at `step` (0 = on the original model)."""
    frame: pd.DataFrame | None = None
    for name, s in scores.items():
        part = s.load()[["example_id", "score"]].rename(columns={"score": name})
        frame = part if frame is None else frame.merge(part, on="example_id", how="outer")
    assert frame is not None
    frame.insert(0, "step", step)
    frame.insert(0, "seed", seed)
    return frame


def examples_table(run: Run, frames: list[pd.DataFrame], forgotten: list[dict[str, Any]]) -> pd.DataFrame:
    """examples.parquet: per seed and scoring step, every training example's label and proxy scores,
    and for each tiering proxy the step and tier at which the example was forgotten."""
    train = dataset_on(run.cfg.data, run.device).train
    labels = pd.DataFrame({"example_id": train.ids(), "label": train.y.cpu().numpy()})
    table = pd.concat(frames, ignore_index=True).merge(labels, on="example_id", how="left")
    if forgotten:
        marks = pd.DataFrame(forgotten)
        for proxy in run.cfg.proxies:
            part = marks[marks["proxy"] == proxy].drop(columns="proxy")
            part = part.rename(columns={"step": f"forget_step_{proxy}", "tier": f"forget_tier_{proxy}"})
            table = table.merge(part, on=["seed", "example_id"], how="left")
    for col in [c for c in table.columns if c.startswith("forget_step_")]:
        table[col] = table[col].astype("Int64")
    front = ["seed", "step", "example_id", "label"]
    table = table[front + [c for c in table.columns if c not in front]]
    table.insert(0, "config_sha", run.provenance["config_sha"])
    table.insert(0, "run", run.cfg.name)
    return table.sort_values(["seed", "step", "example_id"], ignore_index=True)


def proxies_table(run: Run, originals: dict[int, Trained], scores: dict[int, dict[str, Scores]],
                  truth: Scores | None) -> pd.DataFrame:
    """proxies.parquet: per seed and proxy, agreement with true memorization (when estimated) and cost."""
    from rumflow.proxies.quality import proxy_quality

    ids = run.ids
    mem = None if truth is None else truth.load().set_index("example_id").loc[ids, "score"].to_numpy()
    frames = []
    for seed, by_proxy in scores.items():
        values = {p: s.load().set_index("example_id").loc[ids, "score"].to_numpy() for p, s in by_proxy.items()}
        seconds = {p: s.seconds for p, s in by_proxy.items()}
        table = proxy_quality(values, mem, run.cfg.forget.per_tier, seconds, originals[seed].seconds)
        table.insert(0, "seed", seed)
        frames.append(table)
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "config_sha", run.provenance["config_sha"])
    out.insert(0, "run", run.cfg.name)
    return out


STRATEGY_ORDER = ("original", "retrain", "rum", "vanilla")


def steps_table(run: Run, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """steps.parquet: the recorded rows in a fixed order, plus the columns derived from them (ToW, RTE)."""
    df = pd.DataFrame(rows)
    order = [df["seed"], df["proxy"].map(run.cfg.proxies.index), df["step"],
             df["strategy"].map(STRATEGY_ORDER.index), df["stage"].map((*TIERS, "mix").index)]
    df = df.iloc[np.lexsort(order[::-1])].reset_index(drop=True)
    return add_derived_columns(df)


def chain_workers(cfg: ExperimentConfig, chains: int) -> int:
    """Chains run at once: one per CPU core (each with one intra-op thread), one on a GPU."""
    if resolve_device(cfg.device).type != "cpu":
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), chains))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Set torch's intra-op threads for the duration (chains in parallel each get one core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parallel(fn: Callable[..., T], calls: list[tuple], workers: int) -> list[T]:
    """fn(*args) for every args, on `workers` threads inside the flow run's context; results in order.
    The first failure is raised and the calls not yet started are cancelled."""
    if workers <= 1:
        return [fn(*args) for args in calls]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chain") as pool:
        futures = [pool.submit(contextvars.copy_context().run, fn, *args) for args in calls]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


@flow(name="rumflow-experiment", log_prints=True)
def experiment(config: ExperimentConfig, out: str = "runs") -> str:
    """Run the whole experiment of `config` under `<out>/<config.name>/` and return that folder."""
    cfg = validate_config(config)
    run_dir = Path(out).expanduser().resolve() / cfg.name
    check_feasible(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(dump_config(cfg), run_dir / "config.yaml")
    run = Run(cfg, run_dir, cfg.device)
    run.start_progress()
    log = get_run_logger()
    truth = run.memorization() if cfg.memorization.estimate or "memorization" in cfg.proxies else None

    def prepare(seed: int) -> tuple[Trained, dict[str, Scores]]:
        original = run.train_model(seed, [], record_events=True)
        log.info(f"seed {seed}: original model trained in {original.seconds:.1f}s")
        return original, {p: run.scores(p, seed, original, original.ckpt) for p in cfg.proxies}

    grid = [(seed, proxy) for seed in cfg.seeds for proxy in cfg.proxies]
    workers = chain_workers(cfg, len(grid))
    with torch_threads(1 if workers > 1 else torch.get_num_threads()):
        prepared = dict(zip(cfg.seeds, parallel(prepare, [(s,) for s in cfg.seeds], workers)))
        done = parallel(lambda seed, proxy: run_chain(run, seed, proxy, prepared[seed][0], prepared[seed][1][proxy]),
                        grid, workers)
        chains = dict(zip(grid, done))
        originals = {seed: p[0] for seed, p in prepared.items()}
        scores = {seed: p[1] for seed, p in prepared.items()}
        write_parquet(steps_table(run, [r for c in done for r in c.rows]), run_dir / "steps.parquet")
        frames = [_scores_frame(seed, 0, scores[seed]) for seed in cfg.seeds] + [f for c in done for f in c.examples]
        write_parquet(examples_table(run, frames, [m for c in done for m in c.forgotten]),
                      run_dir / "examples.parquet")
        write_parquet(proxies_table(run, originals, scores, truth), run_dir / "proxies.parquet")
        if cfg.evaluate.forgetting_quality.models:
            log.info(f"forgetting quality with {cfg.evaluate.forgetting_quality.models} models per side")
            write_parquet(forgetting_quality_table(run, originals[cfg.seeds[0]], cfg.seeds[0], chains),
                          run_dir / "forgetting_quality.parquet")
    build_report(run_dir)
    publish_summary(cfg.name, (run_dir / "summary.md").read_text())
    return str(run_dir)
