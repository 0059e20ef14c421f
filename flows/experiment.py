"""The experiment flow: train -> proxies -> K steps of RUM and vanilla unlearning -> retrain -> Parquet.

The flow only orchestrates: it submits every task to the configured task runner with its dependencies
(futures), then consumes the results as they finish (progress, one table artifact per step), and hands
them to the row and table builders of rumflow.records.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed

from rumflow.artifacts.prefect_artifacts import (advance_progress, artifact_key, publish_step_table,
                                                 publish_summary, start_progress)
from rumflow.artifacts.report import build_report
from rumflow.artifacts.tables import write_parquet
from rumflow.artifacts import runfolder
from rumflow.config import ExperimentConfig, MethodSpec, dump_config, validate_config
from rumflow.flows.runners import gpu_slot, task_runner, torch_threads_per_worker
from rumflow.methods.registry import get_method
from rumflow.metrics import add_derived_columns, tow
from rumflow.planning import TIERS
from rumflow.proxies.registry import PROXIES
from rumflow import records
from rumflow.runtime import check_feasible, dataset_on
from rumflow.tasks.caching import (DATA, EVALUATION, MODELS, STORE, TRAINING, code_sha, in_run_dir,
                                   method_modules, record_storage)
from rumflow.tasks.work import (evaluate_task, forgetting_quality_task, memorization_task, plan_task, prepare_task,
                                proxy_task, train_task, unlearn_task)

NONE = MethodSpec(method="none")
RETRAIN = MethodSpec(method="retrain")


def unlearn_seed(seed: int, step: int, stage: str) -> int:
    """A distinct, reproducible seed for every unlearning call of a chain."""
    return seed * 100_003 + step * 101 + records.STAGES.index(stage)


def replica_seed(index: int) -> int:
    """Seeds of the forgetting-quality replicas, apart from the experiment's own seeds."""
    return 1_000_000 + index


@dataclass
class Row:
    """A steps.parquet row to be: its model's future, its evaluation's future, and what it is."""

    seed: int
    proxy: str
    strategy: str
    step: int
    stage: str
    final: bool
    spec: MethodSpec
    model: PrefectFuture
    metrics: PrefectFuture
    plan: PrefectFuture
    retrain: PrefectFuture
    code: str
    after: list[PrefectFuture] = field(default_factory=list)  # RUM: the earlier sub-steps of this step


@dataclass
class Step:
    """One (seed, proxy, step): its rows, published as one table artifact when all are done."""

    seed: int
    proxy: str
    k: int
    rows: list[Row] = field(default_factory=list)


class Submitter:
    """The run's tasks bound to its folder, submitted with names that say what each call is."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path):
        self.cfg, self.workdir = cfg, str(run_dir)
        storage = record_storage(run_dir)
        bound = {t.name: in_run_dir(t, storage) for t in (train_task, proxy_task, memorization_task, plan_task,
                                                           prepare_task, unlearn_task, evaluate_task,
                                                           forgetting_quality_task)}
        self.tasks = bound
        self.futures: list[PrefectFuture] = []

    def submit(self, name: str, label: str, **params: Any) -> PrefectFuture:
        # The label (seed, proxy, step, ...) names the task run and is deliberately not made Prefect tags:
        # every tagged task run acquires, renews and releases a tag-concurrency lease on the API, and under
        # the default run's load the embedded SQLite server answered those with 503s, which failed the flow
        # run (measured with Prefect 3.9.1).
        with gpu_slot(self.cfg):
            future = self.tasks[name].submit(**params, label=label)
        self.futures.append(future)
        return future

    def train(self, seed: int, plan: Any, label: str, events: bool = False) -> PrefectFuture:
        c = self.cfg
        return self.submit("train", label, data=c.data, model=c.model, train=c.train, seed=seed, plan=plan,
                           record_events=events, device=c.device, workdir=self.workdir)

    def scores(self, proxy: str, seed: int, original: Any, parent: Any, label: str) -> PrefectFuture:
        c = self.cfg
        return self.submit("proxy", label, proxy=proxy, trained=original, parent=parent, data=c.data,
                           model=c.model, holdout=c.holdout, seed=seed, device=c.device, workdir=self.workdir)

    def unlearn(self, parent: Any, plan: Any, stage: str, spec: MethodSpec, seed: int,
                label: str) -> PrefectFuture:
        """An unlearning call, preceded by its method's cached preparation when it has one."""
        c, prep = self.cfg, get_method(spec.method).prepare
        prepared = None
        if prep is not None:
            every = spec.params.model_dump(mode="json")  # the key holds only what the preparation reads
            params = {k: every[k] for k in prep.params} if prep.params else every
            prepared = self.submit("prepare", label, parent=parent, method=spec.method, params=params,
                                   plan=plan, stage=stage,
                                   policy=c.forget.retain_policy if prep.uses_retain else None,
                                   seed=seed if prep.uses_seed else None, data=c.data, model=c.model,
                                   train=c.train, device=c.device, workdir=self.workdir)
        return self.submit("unlearn", label, parent=parent, plan=plan, stage=stage,
                           policy=c.forget.retain_policy, spec=spec, seed=seed, data=c.data, model=c.model,
                           train=c.train, device=c.device, workdir=self.workdir, prepared=prepared)

    def evaluate(self, model: Any, plan: Any, seed: int, label: str) -> PrefectFuture:
        c = self.cfg
        return self.submit("evaluate", label, trained=model, plan=plan, data=c.data, model=c.model,
                           evaluate=c.evaluate, seed=seed, device=c.device, workdir=self.workdir)


TRAIN_CODE = code_sha(DATA + MODELS + TRAINING + STORE + EVALUATION + ("rumflow.tasks.training",))


def method_code(spec: MethodSpec) -> str:
    """`code_sha` of rows produced by `spec`'s method: its modules, the shared code, the evaluation."""
    return code_sha(DATA + MODELS + TRAINING + STORE + EVALUATION + method_modules(spec.method)
                    + ("rumflow.tasks.unlearning",))


def submit_chain_step(s: Submitter, seed: int, proxy: str, k: int, chain: dict[str, Any],
                      original: PrefectFuture) -> Iterator[None]:
    """Step k of a (seed, proxy) chain: plan, retrain reference, RUM's tiers, vanilla, evaluations.

    A generator that pauses after each submit (see `interleave`); it returns the step's Step."""
    cfg, where = s.cfg, f"s{seed}/{proxy}/step{k}"
    if k > 1 and proxy in cfg.recompute:
        chain["scores"] = s.scores(proxy, seed, original, chain["rum"], f"{where}/{proxy}-on-rum")
        chain["recomputed"].append((k, chain["scores"]))
        yield
    plan = s.submit("plan", where, step=k, proxy=proxy, scores=chain["scores"], previous=chain["plan"],
                    per_tier=cfg.forget.per_tier, data=cfg.data, device=cfg.device, workdir=s.workdir)
    chain["plan"] = plan
    yield
    step = Step(seed, proxy, k)
    retrain = s.train(seed, plan, f"{where}/retrain")
    yield
    if k == 1:
        step.rows.append(Row(seed, proxy, "original", 0, "mix", True, NONE, original,
                             s.evaluate(original, plan, seed, f"{where}/original"), plan, retrain,
                             TRAIN_CODE))
        yield
    step.rows.append(Row(seed, proxy, "retrain", k, "mix", True, RETRAIN, retrain,
                         s.evaluate(retrain, plan, seed, f"{where}/retrain"), plan, retrain, TRAIN_CODE))
    yield
    earlier: list[PrefectFuture] = []
    for stage in TIERS:
        spec = getattr(cfg.rum, stage)
        label = f"{where}/rum-{stage}/{spec.method}"
        chain["rum"] = s.unlearn(chain["rum"], plan, stage, spec, unlearn_seed(seed, k, stage), label)
        yield
        step.rows.append(Row(seed, proxy, "rum", k, stage, stage == TIERS[-1], spec, chain["rum"],
                             s.evaluate(chain["rum"], plan, seed, label), plan, retrain, method_code(spec),
                             after=list(earlier)))
        earlier.append(chain["rum"])
        yield
    label = f"{where}/vanilla/{cfg.vanilla.method}"
    chain["vanilla"] = s.unlearn(chain["vanilla"], plan, "mix", cfg.vanilla, unlearn_seed(seed, k, "mix"), label)
    yield
    step.rows.append(Row(seed, proxy, "vanilla", k, "mix", True, cfg.vanilla, chain["vanilla"],
                         s.evaluate(chain["vanilla"], plan, seed, label), plan, retrain,
                         method_code(cfg.vanilla)))
    chain["plans"].append(plan)
    return step


def interleave(steps: list[Iterator[None]]) -> list[Any]:
    """Run the submitting generators one submit at a time, round robin, and return what each returned.

    The thread and process runners take tasks first in, first out, and a task waiting for its upstream
    holds its worker: interleaving the chains puts tasks of other chains between a task and the one
    that needs it, so the workers run chains side by side instead of waiting on each other."""
    results: list[Any] = [None] * len(steps)
    live = list(enumerate(steps))
    while live:
        still = []
        for i, gen in live:
            try:
                next(gen)
                still.append((i, gen))
            except StopIteration as done:
                results[i] = done.value
        live = still
    return results


def build_rows(cfg: ExperimentConfig, base: dict[str, Any], step: Step, n_train: int) -> list[dict[str, Any]]:
    """The finished step's steps.parquet rows (every future it names is done)."""
    out = []
    for r in step.rows:
        model, plan, retrain = r.model.result(), r.plan.result(), r.retrain.result()
        seconds_step = model.seconds + sum(f.result().seconds for f in r.after)
        out.append(records.step_row(
            base=base, seed=r.seed, proxy=r.proxy, strategy=r.strategy, step=r.step, stage=r.stage, final=r.final,
            spec=r.spec, checkpoint=model.ckpt.sha256, seconds=model.seconds, seconds_step=seconds_step,
            retrain_seconds=retrain.seconds, plan=plan, n_train=n_train, retain_policy=cfg.forget.retain_policy,
            examples=int(getattr(model, "examples", 0) or (cfg.train.epochs * (n_train - len(plan.forgotten))
                                                           if r.strategy == "retrain" else 0)),
            code_sha=r.code, metrics=r.metrics.result()))
    return out


def step_line(step: Step, rows: list[dict[str, Any]], cached: bool) -> str:
    """The log line of a finished step."""
    by = {(r["strategy"], r["final"]): r for r in rows}
    rum, van, ref = by[("rum", True)], by[("vanilla", True)], by[("retrain", True)]

    def t(r: dict[str, Any]) -> float:
        return float(tow(r["acc_forget"], r["acc_retain"], r["acc_test"],
                         ref["acc_forget"], ref["acc_retain"], ref["acc_test"]))

    cost = ("cached" if cached else f"seconds rum {rum['seconds_step']:.1f} vanilla {van['seconds']:.1f} "
            f"retrain {ref['seconds']:.1f}")
    return (f"seed {step.seed} | {step.proxy} | step {step.k}: ToW rum {t(rum):.3f} vanilla {t(van):.3f} | "
            f"forget acc rum {rum['acc_forget']:.3f} vanilla {van['acc_forget']:.3f} retrain "
            f"{ref['acc_forget']:.3f} | {cost}")


def _is_cached(future: PrefectFuture) -> bool:
    return future.state.name == "Cached"


def submit_forgetting_quality(s: Submitter, seed: int, originals: dict[int, PrefectFuture],
                              first_plans: dict[str, PrefectFuture]) -> list[tuple[str, str, PrefectFuture]]:
    """Per proxy and strategy: N unlearned models (the step-1 chain with N unlearning seeds) against N
    retrained ones (N training seeds), at step 1 of the first seed."""
    cfg, n = s.cfg, s.cfg.evaluate.forgetting_quality.models
    strategies = {"rum": [(stage, getattr(cfg.rum, stage)) for stage in TIERS], "vanilla": [("mix", cfg.vanilla)]}
    out = []
    for proxy in cfg.proxies:
        plan, where = first_plans[proxy], f"s{seed}/{proxy}/step1/fq"
        retrained = [s.train(replica_seed(i), plan, f"{where}/retrain-{i}") for i in range(n)]
        for strategy, stages in strategies.items():
            models = []
            for i in range(n):
                model = originals[seed]
                for stage, spec in stages:
                    model = s.unlearn(model, plan, stage, spec, unlearn_seed(replica_seed(i), 1, stage),
                                      f"{where}/{strategy}-{i}/{stage}/{spec.method}")
                models.append(model)
            fq = s.submit("forgetting-quality", f"{where}/{strategy}", unlearned=models, retrained=retrained,
                          plan=plan, data=cfg.data, model=cfg.model, quality=cfg.evaluate.forgetting_quality,
                          device=cfg.device, workdir=s.workdir)
            out.append((proxy, strategy, fq))
    return out


@flow(name="rumflow-experiment", log_prints=False)
def experiment(config: ExperimentConfig, out: str = "runs") -> str:
    """Run the whole experiment of `config` under `<out>/<config.name>/` and return that folder."""
    cfg = validate_config(config)
    run_dir = Path(out).expanduser().resolve() / cfg.name
    check_feasible(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with runfolder.hold(run_dir, cfg.digest(), cfg.name), api_for_workers():
        runfolder.mark_incomplete(run_dir)  # until finish() writes the manifest, the folder says so
        return _experiment(cfg, run_dir)


@contextmanager
def api_for_workers():
    """Worker processes (process pool, Ray on this machine) report to this flow's API, the embedded
    server included: they inherit PREFECT_API_URL for the duration of the flow."""
    from rumflow.flows.runners import worker_api_url

    before, url = os.environ.get("PREFECT_API_URL"), worker_api_url()
    if url:
        os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def _experiment(cfg: ExperimentConfig, run_dir: Path) -> str:
    """The body of the experiment flow (in its run context)."""
    log = get_run_logger()
    s = Submitter(cfg, run_dir)
    base = records.provenance(cfg)
    key = artifact_key(cfg.name, base["config_sha"][:8])

    truth = None
    if cfg.memorization.estimate or "memorization" in cfg.proxies:
        truth = s.submit("memorization", f"R{cfg.memorization.models}", data=cfg.data, model=cfg.model,
                         train=cfg.train, memorization=cfg.memorization, device=cfg.device, workdir=s.workdir)
    originals: dict[int, PrefectFuture] = {}
    scores: dict[int, dict[str, PrefectFuture]] = {}
    for seed in cfg.seeds:
        originals[seed] = s.train(seed, None, f"s{seed}/original", events=True)
        scores[seed] = {p: (truth if PROXIES[p].source == "memorization" else
                            s.scores(p, seed, originals[seed], originals[seed], f"s{seed}/{p}"))
                        for p in cfg.proxies}
    chains = {(seed, p): {"rum": originals[seed], "vanilla": originals[seed], "plan": None, "plans": [],
                          "scores": scores[seed][p], "recomputed": []}
              for seed in cfg.seeds for p in cfg.proxies}
    steps: list[Step] = []
    for k in range(1, cfg.forget.steps + 1):  # the chains' tasks interleaved, so every worker stays busy
        steps += interleave([submit_chain_step(s, seed, p, k, chain, originals[seed])
                             for (seed, p), chain in chains.items()])
    fq = []
    if cfg.evaluate.forgetting_quality.models:
        first = cfg.seeds[0]
        fq = submit_forgetting_quality(s, first, originals, {p: chains[(first, p)]["plans"][0] for p in cfg.proxies})

    n_train = len(dataset_on(cfg.data, cfg.device).train)
    rows = consume(cfg, s, steps, base, key, n_train, log)
    outputs = write_outputs(cfg, run_dir, base, rows, originals, scores, chains, truth, fq)
    outputs += build_report(run_dir)
    runfolder.finish(run_dir, dump_config(cfg), outputs, cfg.digest())  # config.yaml, then the manifest last
    publish_summary(key, (run_dir / "summary.md").read_text(), str(run_dir))
    return str(run_dir)


def consume(cfg: ExperimentConfig, s: Submitter, steps: list[Step], base: dict[str, Any], key: str, n_train: int,
            log: Any) -> list[dict[str, Any]]:
    """Follow the submitted work as it finishes: progress over every task, and each step's table and log
    line once all of its tasks are done. Returns every row."""
    total = len(s.futures)
    progress = start_progress(key, total, f"{total} tasks: training, proxies, references, unlearning, evaluation")
    pending = {id(step): {id(f) for r in step.rows for f in (r.model, r.metrics, r.plan, r.retrain)}
               for step in steps}
    waiting = {}
    for step in steps:
        for r in step.rows:
            for f in (r.model, r.metrics, r.plan, r.retrain):
                waiting.setdefault(id(f), []).append(step)
    rows: dict[int, list[dict[str, Any]]] = {}
    done, shown = 0, -1
    for future in as_completed(list(s.futures)):
        future.result()  # raise the first failure here, with its task's error
        done += 1
        if int(100 * done / total) != shown:
            shown = int(100 * done / total)
            advance_progress(progress, done, total)
        for step in waiting.get(id(future), []):
            left = pending[id(step)]
            left.discard(id(future))
            if not left:
                built = build_rows(cfg, base, step, n_train)
                rows[id(step)] = built
                cached = all(_is_cached(f) for r in step.rows for f in (r.model, r.metrics))
                log.info(step_line(step, built, cached))
                publish_step_table(key, step.seed, step.proxy, step.k,
                                   add_derived_columns(pd.DataFrame(built)).to_dict("records"))
    return [row for step in steps for row in rows[id(step)]]


def write_outputs(cfg: ExperimentConfig, run_dir: Path, base: dict[str, Any], rows: list[dict[str, Any]],
                  originals: dict[int, PrefectFuture], scores: dict[int, dict[str, PrefectFuture]],
                  chains: dict[tuple[int, str], dict[str, Any]], truth: PrefectFuture | None,
                  fq: list[tuple[str, str, PrefectFuture]]) -> list[Path]:
    """steps.parquet, examples.parquet, proxies.parquet (and forgetting_quality.parquet); their paths."""
    written = [write_parquet(records.steps_table(rows, cfg.proxies), run_dir / "steps.parquet")]
    train = dataset_on(cfg.data, cfg.device).train
    blocks = [records.scores_block(seed, 0, {p: f.result().load(run_dir) for p, f in scores[seed].items()})
              for seed in cfg.seeds]
    marks = []
    for (seed, p), chain in chains.items():
        blocks += [records.scores_block(seed, k, {p: f.result().load(run_dir)}) for k, f in chain["recomputed"]]
        for plan in chain["plans"]:
            marks += records.forgotten_marks(seed, p, plan.result())
    written.append(write_parquet(records.examples_table(base, cfg.proxies, train.ids(), train.y.cpu().numpy(),
                                                        blocks, marks), run_dir / "examples.parquet"))
    quality = {seed: {p: (f.result().load(run_dir), f.result().seconds) for p, f in by.items()}
               for seed, by in scores.items()}
    written.append(write_parquet(records.proxies_table(
        base, cfg.forget.per_tier, train.ids(), truth.result().load(run_dir) if truth is not None else None,
        quality, {seed: f.result().seconds for seed, f in originals.items()}), run_dir / "proxies.parquet"))
    if fq:
        n = cfg.evaluate.forgetting_quality.models
        table = pd.DataFrame([records.forgetting_quality_row(base=base, seed=cfg.seeds[0], proxy=p, strategy=st,
                                                             models=n, result=f.result()) for p, st, f in fq])
        written.append(write_parquet(table, run_dir / "forgetting_quality.parquet"))
    return written


def configured(cfg: ExperimentConfig):
    """The experiment flow on the task runner `cfg.runner` asks for, its workers' torch threads set."""
    os.environ["RUMFLOW_TORCH_THREADS"] = str(torch_threads_per_worker(cfg.runner, cfg.device))
    torch.set_num_threads(int(os.environ["RUMFLOW_TORCH_THREADS"]))
    return experiment.with_options(task_runner=task_runner(cfg))
