"""The experiment flow: train -> proxies -> K steps of RUM and vanilla unlearning -> retrain -> Parquet.

The flow only orchestrates: it submits the sources (originals, proxies, true memorization) to the
configured task runner, runs each (seed, proxy) chain as a subflow and each of its steps as a subflow
of the chain (the units of the Prefect UI's run graph), every task submitted with its dependencies
(futures) to the one task runner the flow lends its subflows, and hands the results to the row and
table builders of rumflow.records.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch
from prefect import flow, task
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import PrefectHTTPStatusError
from prefect.futures import PrefectFuture, as_completed
from prefect.logging.loggers import flow_run_logger, get_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from rumflow.artifacts.prefect_artifacts import (advance_progress, artifact_key, publish_step_table,
                                                 publish_summary, start_progress)
from rumflow.artifacts.tables import write_parquet
from rumflow.artifacts import runfolder
from rumflow.config import ExperimentConfig, MethodSpec, dump_config, validate_config
from rumflow.flows.runners import (SharedTaskRunner, gpu_slot, shared_state, sharing, task_runner,
                                  torch_threads_per_worker, worker_count)
from rumflow.methods.registry import get_method
from rumflow.metrics import add_derived_columns, tow
from rumflow.planning import TIERS
from rumflow.proxies.registry import PROXIES
from rumflow import records
from rumflow.runtime import check_feasible, dataset_on
from rumflow.tasks.caching import (DATA, EVALUATION, MODELS, STORE, TRAINING, TaskKey, code_digest, code_sha,
                                   in_run_dir, method_modules, record_storage, task_modules)
from rumflow.tasks.compute import ranked
from rumflow.tasks.records import RecordSerializer
from rumflow.tasks.refs import ChainRecord
from rumflow.tasks.report import report_task, table_digests
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


class Stopping(RuntimeError):
    """A chain that stopped because another one failed (the other's error is the run's)."""


_SINK: ContextVar[list[PrefectFuture] | None] = ContextVar("rumflow_submitted", default=None)


class Submitter:
    """The run's tasks bound to its folder, submitted with names that say what each call is."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path):
        self.cfg, self.workdir = cfg, str(run_dir)
        self.storage = storage = record_storage(run_dir)
        bound = {t.name: in_run_dir(t, storage) for t in (train_task, proxy_task, memorization_task, plan_task,
                                                           prepare_task, unlearn_task, evaluate_task,
                                                           forgetting_quality_task, report_task)}
        self.tasks = bound
        self.futures: list[PrefectFuture] = []
        self.stop = threading.Event()  # set on the first failure: no new task starts

    @contextmanager
    def collecting(self) -> Iterator[list[PrefectFuture]]:
        """Also gather, in a list of this thread's own, every future submitted inside the block."""
        sink: list[PrefectFuture] = []
        token = _SINK.set(sink)
        try:
            yield sink
        finally:
            _SINK.reset(token)

    def submit(self, name: str, label: str, **params: Any) -> PrefectFuture:
        # The label (seed, proxy, step, ...) names the task run and is deliberately not made Prefect tags:
        # every tagged task run acquires, renews and releases a tag-concurrency lease on the API, and under
        # the default run's load the embedded SQLite server answered those with 503s, which failed the flow
        # run (measured with Prefect 3.9.1).
        if self.stop.is_set():
            raise Stopping("the run is stopping after a failed task: no new task starts")
        with gpu_slot(self.cfg):
            future = self.tasks[name].submit(**params, label=label)
        self.futures.append(future)
        if (sink := _SINK.get()) is not None:
            sink.append(future)
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


@dataclass
class Chain:
    """One (seed, proxy) chain's state between its steps: the futures each next step starts from."""

    seed: int
    proxy: str
    original: PrefectFuture
    scores: PrefectFuture
    rum: PrefectFuture
    vanilla: PrefectFuture
    plan: PrefectFuture | None = None
    plans: list[PrefectFuture] = field(default_factory=list)
    recomputed: list[tuple[int, PrefectFuture]] = field(default_factory=list)


def submit_step(s: Submitter, chain: Chain, k: int) -> Step:
    """Step k of a chain: plan, retrain reference, RUM's tiers, vanilla, and their evaluations."""
    cfg, seed, proxy, where = s.cfg, chain.seed, chain.proxy, f"s{chain.seed}/{chain.proxy}/step{k}"
    if k > 1 and proxy in cfg.recompute:
        chain.scores = s.scores(proxy, seed, chain.original, chain.rum, f"{where}/{proxy}-on-rum")
        chain.recomputed.append((k, chain.scores))
    plan = s.submit("plan", where, step=k, proxy=proxy, scores=chain.scores, previous=chain.plan,
                    per_tier=cfg.forget.per_tier, data=cfg.data, device=cfg.device, workdir=s.workdir)
    chain.plan = plan
    step = Step(seed, proxy, k)
    retrain = s.train(seed, plan, f"{where}/retrain")
    if k == 1:
        step.rows.append(Row(seed, proxy, "original", 0, "mix", True, NONE, chain.original,
                             s.evaluate(chain.original, plan, seed, f"{where}/original"), plan, retrain,
                             TRAIN_CODE))
    step.rows.append(Row(seed, proxy, "retrain", k, "mix", True, RETRAIN, retrain,
                         s.evaluate(retrain, plan, seed, f"{where}/retrain"), plan, retrain, TRAIN_CODE))
    earlier: list[PrefectFuture] = []
    for stage in TIERS:
        spec = getattr(cfg.rum, stage)
        label = f"{where}/rum-{stage}/{spec.method}"
        chain.rum = s.unlearn(chain.rum, plan, stage, spec, unlearn_seed(seed, k, stage), label)
        step.rows.append(Row(seed, proxy, "rum", k, stage, stage == TIERS[-1], spec, chain.rum,
                             s.evaluate(chain.rum, plan, seed, label), plan, retrain, method_code(spec),
                             after=list(earlier)))
        earlier.append(chain.rum)
    label = f"{where}/vanilla/{cfg.vanilla.method}"
    chain.vanilla = s.unlearn(chain.vanilla, plan, "mix", cfg.vanilla, unlearn_seed(seed, k, "mix"), label)
    step.rows.append(Row(seed, proxy, "vanilla", k, "mix", True, cfg.vanilla, chain.vanilla,
                         s.evaluate(chain.vanilla, plan, seed, label), plan, retrain, method_code(cfg.vanilla)))
    chain.plans.append(plan)
    return step


def tasks_per_call(spec: MethodSpec) -> int:
    """Tasks one `Submitter.unlearn` call submits: the unlearning, and its method's preparation if any."""
    return 2 if get_method(spec.method).prepare is not None else 1


def tasks_per_step(cfg: ExperimentConfig, proxy: str, k: int) -> int:
    """How many tasks `submit_step` submits for step k of a `proxy` chain (the progress bar's share)."""
    call = tasks_per_call
    n = (k > 1 and proxy in cfg.recompute) + 1 + 1 + (k == 1) + 1  # proxy, plan, retrain, evaluations
    return n + sum(call(getattr(cfg.rum, stage)) + 1 for stage in TIERS) + call(cfg.vanilla) + 1


def planned_tasks(cfg: ExperimentConfig) -> int:
    """Every task the experiment submits: sources (true memorization, originals, proxies), the chains'
    steps and the forgetting-quality replicas; the progress bar counts them all."""
    sources = int(bool(cfg.memorization.estimate or "memorization" in cfg.proxies))
    sources += len(cfg.seeds) * (1 + sum(PROXIES[p].source != "memorization" for p in cfg.proxies))
    steps = len(cfg.seeds) * sum(tasks_per_step(cfg, p, k) for p in cfg.proxies
                                 for k in range(1, cfg.forget.steps + 1))
    n = cfg.evaluate.forgetting_quality.models
    calls = {"rum": [getattr(cfg.rum, stage) for stage in TIERS], "vanilla": [cfg.vanilla]}
    fq = sum(n + sum(n * sum(tasks_per_call(spec) for spec in specs) + 1
                     for specs in calls.values()) for _ in cfg.proxies) if n else 0
    return sources + steps + fq + 1  # the report


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


def step_line(seed: int, proxy: str, k: int, rows: list[dict[str, Any]], cached: bool) -> str:
    """The log line of a finished step."""
    by = {(r["strategy"], r["final"]): r for r in rows}
    rum, van, ref = by[("rum", True)], by[("vanilla", True)], by[("retrain", True)]

    def t(r: dict[str, Any]) -> float:
        return float(tow(r["acc_forget"], r["acc_retain"], r["acc_test"],
                         ref["acc_forget"], ref["acc_retain"], ref["acc_test"]))

    cost = ("cached" if cached else f"seconds rum {rum['seconds_step']:.1f} vanilla {van['seconds']:.1f} "
            f"retrain {ref['seconds']:.1f}")
    return (f"seed {seed} | {proxy} | step {k}: ToW rum {t(rum):.3f} vanilla {t(van):.3f} | "
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


class Progress:
    """The run's progress artifact: finished tasks over every task the run plans (thread-safe; the
    chains' subflows tick it as their tasks finish)."""

    def __init__(self, key: str, total: int):
        self.total, self.done, self.shown, self.lock = total, 0, -1, threading.Lock()
        self.id = start_progress(key, total, f"{total} tasks: training, proxies, references, unlearning, "
                                             "evaluation")

    def tick(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
            if int(100 * self.done / self.total) != self.shown:
                self.shown = int(100 * self.done / self.total)
                advance_progress(self.id, self.done, self.total)


@dataclass
class Run:
    """What a running experiment's subflows share in this process (their parameters stay small: the run
    key, seed, proxy, step), lent to them with the flow's task runner (flows.runners.sharing)."""

    cfg: ExperimentConfig
    submitter: Submitter
    base: dict[str, Any]
    key: str
    n_train: int
    progress: Progress
    chains: dict[tuple[int, str], Chain]
    rows: dict[tuple[int, str, int], list[dict[str, Any]]] = field(default_factory=dict)
    models: dict[tuple[int, str], list[Any]] = field(default_factory=dict)  # CheckpointRefs of each chain's rows


# Chains in flight per worker: enough independent tasks (each step's retrain, RUM and vanilla branches)
# to keep every worker busy, few enough that a cached re-run does not flood the API with subflow runs at
# once (with 15 at once, the embedded SQLite server answered a subflow's task-run creation with 503).
CHAINS_PER_WORKER = 2


class Handoff(BaseModel):
    """What a step hands to the next one of its chain: the models it ends with (drawn as the edge
    between the two step subflows in the run graph)."""

    seed: int
    proxy: str
    step: int
    rum_sha256: str
    vanilla_sha256: str


def settle(futures: list[PrefectFuture], run: Run) -> None:
    """Wait for `futures` in the order they finish, raising the first failure; tick the progress."""
    for future in as_completed(futures):
        try:
            future.result()
        except BaseException:
            run.submitter.stop.set()  # the other chains stop at their next submit
            raise
        run.progress.tick()


@flow(name="rumflow-step", flow_run_name="s{seed}/{proxy}/step{k}", log_prints=False)
def step_flow(run_key: str, seed: int, proxy: str, k: int, previous: Handoff | None = None) -> Handoff:
    """Step k of the (seed, proxy) chain, starting from the models `previous` ended with: its tasks, then
    its table artifact and log line once they are all done."""
    run: Run = shared_state(run_key)
    chain = run.chains[(seed, proxy)]
    with run.submitter.collecting() as submitted:
        step = submit_step(run.submitter, chain, k)
    settle(submitted, run)
    rows = build_rows(run.cfg, run.base, step, run.n_train)
    run.rows[(seed, proxy, k)] = rows
    run.models.setdefault((seed, proxy), []).extend(r.model.result().ckpt for r in step.rows)
    cached = all(_is_cached(f) for r in step.rows for f in (r.model, r.metrics))
    ctx = FlowRunContext.get()  # the step's logger (the chain task's run context is still set here)
    report_step(run, seed, proxy, k, rows, cached, flow_run_logger(ctx.flow_run, ctx.flow))
    return Handoff(seed=seed, proxy=proxy, step=k, rum_sha256=chain.rum.result().ckpt.sha256,
                   vanilla_sha256=chain.vanilla.result().ckpt.sha256)


def report_step(run: Run, seed: int, proxy: str, k: int, rows: list[dict[str, Any]], cached: bool,
                logger: logging.Logger | logging.LoggerAdapter, publish: bool = True) -> None:
    """A finished step's log line and (with `publish`) its table artifact."""
    logger.info(step_line(seed, proxy, k, rows, cached))
    if publish:
        publish_step_table(run.key, seed, proxy, k, add_derived_columns(pd.DataFrame(rows)).to_dict("records"))


def retrying_busy_api(call: Callable[[], Any], what: str, delays: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0)) -> Any:
    """`call()`, called again (after `delays`) while it fails with 503: the embedded SQLite server answers
    503 when a write loses a race with another (SQLITE_BUSY), and creating a subflow run writes its task
    run in a read-then-write transaction that the task-run events of a cached re-run keep racing (measured:
    one of 90 subflow calls of the default experiment's cached re-run failed so, after the client's own
    5 retries). A step or chain called again only finds its work in the cache."""
    for delay in (*delays, None):
        try:
            return call()
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code != 503 or delay is None:
                raise
            logging.getLogger("rumflow").warning("%s: the Prefect API answered 503 (busy); again in %.0f s",
                                                 what, delay)
            time.sleep(delay)


@flow(name="rumflow-chain", flow_run_name="s{seed}/{proxy}", log_prints=False)
def chain_flow(run_key: str, seed: int, proxy: str) -> Handoff | None:
    """The K sequential steps of one (seed, proxy) chain, each a subflow of its own."""
    run: Run = shared_state(run_key)
    previous = None
    step = step_flow.with_options(task_runner=SharedTaskRunner(run_key), result_storage=subflow_results())
    for k in range(1, run.cfg.forget.steps + 1):
        previous = retrying_busy_api(lambda k=k, previous=previous: step(run_key, seed, proxy, k, previous),
                                     f"s{seed}/{proxy}/step{k}")
    return previous


def subflow_results() -> Path:
    """Where a failed chain or step subflow writes its error (Prefect always writes a failed flow run's):
    Prefect's own local storage, as for any flow, not the run folder's cache, which the subflows would
    otherwise inherit from the chain task and where only rumflow's verified records belong."""
    return Path(PREFECT_LOCAL_STORAGE_PATH.value()).expanduser()


@contextmanager
def not_persisting_subflows() -> Iterator[None]:
    """Inside this task, subflows do not write their results: a subflow asks the run context whether to
    persist, finds this task's (persisting, for its own cache record) and would leave one stray record
    per subflow run in the run folder's cache (Prefect 3.9)."""
    ctx = TaskRunContext.get()
    if ctx is None:
        yield
        return
    quiet = ctx.model_copy(update={"persist_result": False})
    quiet._token = None  # a copy of an entered context is not entered itself
    with quiet:
        yield


def chain_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config a chain's results depend on: all of it but what only chooses which chains run
    (name, seeds, proxies), where they run, and the true-memorization estimate (a chain sees its scores)."""
    return cfg.model_dump(mode="json", exclude={"name", "seeds", "proxies", "runner", "memorization"})


def chain_code(cfg: ExperimentConfig) -> str:
    """The digest of the code a chain's tasks run (every task kind a step submits, the methods of the
    RUM tiers and of vanilla) and of the row builders; the chain task adds its own module."""
    names = {"rumflow.records"}
    for t in (plan_task, train_task, proxy_task, prepare_task, unlearn_task, evaluate_task):
        names |= task_modules(t)
    for spec in [*(getattr(cfg.rum, stage) for stage in TIERS), cfg.vanilla]:
        names |= set(method_modules(spec.method))
    return code_digest(names)


def chain_tasks(cfg: ExperimentConfig, proxy: str) -> int:
    """Planned tasks of one `proxy` chain (a cached chain advances the progress by all of them)."""
    return sum(tasks_per_step(cfg, proxy, k) for k in range(1, cfg.forget.steps + 1))


@task(name="chain", task_run_name="chain s{seed}/{proxy}", persist_result=True, cache_result_in_memory=False,
      cache_policy=TaskKey(modules=("rumflow.records",)), result_serializer=RecordSerializer())
def chain_task(run_key: str, seed: int, proxy: str, original: Any, scores: Any, settings: dict[str, Any],
               code: str) -> ChainRecord:
    """Run the (seed, proxy) chain's subflow once its original model and its proxy scores are ready
    (they are its inputs in the run graph); the chain's own tasks go to the flow's task runner.

    Cached as one unit: its key is the original's and the scores' content, the config the chain reads
    (`settings`) and the digest of the code it runs (`code`), so a re-run whose chains are unchanged
    reads one record per chain instead of creating its ~90 subflow and task runs. When the key changes
    (a method edited), the subflow runs and its own tasks come back Cached wherever their keys still hold.

    The subflows send no heartbeats (the experiment's flow run does): Prefect joins a flow run's
    heartbeat thread at its end, and that thread sleeps in 1-second steps, which cost each subflow run
    up to a second (an empty subflow took 1.3 s with them, 0.4 s without, embedded server)."""
    run: Run = shared_state(run_key)
    chain_run = chain_flow.with_options(task_runner=SharedTaskRunner(run_key), result_storage=subflow_results())
    with not_persisting_subflows(), temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
            ranked((list(run.chains).index((seed, proxy)),)):
        retrying_busy_api(lambda: chain_run(run_key, seed, proxy), f"s{seed}/{proxy}")
    chain = run.chains[(seed, proxy)]
    own = [[{k: v for k, v in row.items() if k not in run.base} for row in run.rows[(seed, proxy, k)]]
           for k in range(1, run.cfg.forget.steps + 1)]
    return ChainRecord(rows=own, plans=[f.result() for f in chain.plans],
                       recomputed=[(k, f.result()) for k, f in chain.recomputed], models=run.models[(seed, proxy)])


def wait_for_chains(run: Run, sources: list[PrefectFuture],
                    chains: dict[tuple[int, str], PrefectFuture]) -> dict[tuple[int, str], ChainRecord]:
    """Wait for the sources (ticking the progress) and the chains, and return each chain's record; raise
    the first real failure (a chain that only stopped because another failed waits for that one's error).
    A chain served from its cache ran no step subflow: its steps' log lines come from here, and their
    table artifacts stay those the run that computed them published under the same keys (the keys hold
    the config's digest); publishing 75 again took 5.5 s of a 21-s cached re-run of the default grid."""
    stopped: Stopping | None = None
    which = {id(f): key for key, f in chains.items()}
    done: dict[tuple[int, str], ChainRecord] = {}
    for future in as_completed(sources + list(chains.values())):
        try:
            result = future.result()
        except Stopping as exc:
            stopped = stopped or exc
            continue
        except BaseException:
            run.submitter.stop.set()
            raise
        if id(future) not in which:
            run.progress.tick()
            continue
        seed, proxy = key = which[id(future)]
        done[key] = result
        if _is_cached(future):
            run.progress.tick(chain_tasks(run.cfg, proxy))
            for k, rows in enumerate(result.rows, start=1):
                report_step(run, seed, proxy, k, [{**run.base, **row} for row in rows], True, get_run_logger(),
                            publish=False)
    if stopped is not None:
        raise stopped
    return done


def _experiment(cfg: ExperimentConfig, run_dir: Path) -> str:
    """The body of the experiment flow (in its run context): the sources as tasks, each chain as a
    subflow (driven from a thread of its own, so the chains run side by side), then the outputs."""
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
    chains = {(seed, p): Chain(seed, p, originals[seed], scores[seed][p], originals[seed], originals[seed])
              for seed in cfg.seeds for p in cfg.proxies}
    run = Run(cfg, s, base, key, len(dataset_on(cfg.data, cfg.device).train), Progress(key, planned_tasks(cfg)),
              chains)
    drivers = ThreadPoolTaskRunner(min(len(chains), CHAINS_PER_WORKER * worker_count(cfg.runner, cfg.device)))
    chain, settings, code = in_run_dir(chain_task, s.storage), chain_settings(cfg), chain_code(cfg)
    with sharing(FlowRunContext.get().task_runner, run) as run_key, drivers:
        done = wait_for_chains(run, list(s.futures), {
            (seed, p): drivers.submit(chain, {"run_key": run_key, "seed": seed, "proxy": p, "original": c.original,
                                              "scores": c.scores, "settings": settings, "code": code})
            for (seed, p), c in chains.items()})
    fq = []
    if cfg.evaluate.forgetting_quality.models:
        first = cfg.seeds[0]
        with s.collecting() as submitted:
            fq = submit_forgetting_quality(s, first, originals, {p: done[(first, p)].plans[0] for p in cfg.proxies})
        settle(submitted, run)
    rows = [{**base, **row} for k in range(1, cfg.forget.steps + 1) for key in chains for row in done[key].rows[k - 1]]
    outputs = write_outputs(cfg, run_dir, base, rows, originals, scores, done, truth, fq)
    with s.collecting() as submitted:
        report = s.submit("report", cfg.name, tables=table_digests(run_dir, outputs), workdir=s.workdir)
    settle(submitted, run)
    outputs += [run_dir / rel for rel in report.result().files]
    runfolder.finish(run_dir, dump_config(cfg), outputs, cfg.digest())  # config.yaml, then the manifest last
    publish_summary(key, (run_dir / "summary.md").read_text(), str(run_dir))
    return str(run_dir)


def write_outputs(cfg: ExperimentConfig, run_dir: Path, base: dict[str, Any], rows: list[dict[str, Any]],
                  originals: dict[int, PrefectFuture], scores: dict[int, dict[str, PrefectFuture]],
                  chains: dict[tuple[int, str], ChainRecord], truth: PrefectFuture | None,
                  fq: list[tuple[str, str, PrefectFuture]]) -> list[Path]:
    """steps.parquet, examples.parquet, proxies.parquet (and forgetting_quality.parquet); their paths."""
    written = [write_parquet(records.steps_table(rows, cfg.proxies), run_dir / "steps.parquet")]
    train = dataset_on(cfg.data, cfg.device).train
    blocks = [records.scores_block(seed, 0, {p: f.result().load(run_dir) for p, f in scores[seed].items()})
              for seed in cfg.seeds]
    marks = []
    for (seed, p), chain in chains.items():
        blocks += [records.scores_block(seed, k, {p: found.load(run_dir)}) for k, found in chain.recomputed]
        for plan in chain.plans:
            marks += records.forgotten_marks(seed, p, plan)
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
