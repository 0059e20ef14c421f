"""The service flows: create a service (version 0), one service step (queued requests -> a new version),
and an audit (a retrain reference for ToW / ToW-MIA of the current version).

A step holds the store's lease for its whole run, so at most one run works on a service and the chain
of versions never forks; every unit of work is a cached task keyed by digests and ids, and the step's
outcome (new version, its promotion, one ledger row per request) commits in one transaction, so a run
killed at any point is completed once by the next run.
"""
from __future__ import annotations

import io
import os
import platform
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Failed

import rumflow
from rumflow.artifacts.checkpoints import atomic_write_bytes
from rumflow.artifacts.ledger import Ledger, Step, fsync_dir, is_url, masked, store_target
from rumflow.artifacts.prefect_artifacts import advance_progress, artifact_key, start_progress
from rumflow.artifacts.tables import write_text
from rumflow.errors import ConfigError, DivergenceError
from rumflow.methods.registry import get_method
from rumflow.metrics import tow, tow_mia
from rumflow.planning import TIERS, StepPlan, partition_request
from rumflow.proxies.registry import memorization_of
from rumflow.runtime import dataset_on
from rumflow.service import (SERVICE_FILE, TRAIN_IDS, ServiceConfig, ServiceFolder, apply_gates, derived_figures,
                             dump_service_config, gate_failure, unlearn_seed)
from rumflow.tasks.caching import in_run_dir
from rumflow.tasks.service import (ServiceModel, ensure, evaluate_version, experiment_original, load_state, prepare_tier,
                                   save, score_version, service_root, train_version, unlearn_tier)
from rumflow.training import resolve_device


def _cell(v: Any) -> Any:
    """A JSON-safe table cell (NaN and infinities become empty)."""
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not np.isfinite(v) else v


class StepFailed(RuntimeError):
    """A step committed with its requests failed (a gate missed, or the unlearning diverged); `result`
    is what the step returns. The flow run ends Failed with this message, after the commit."""

    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.result = result or {}

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its result (Prefect may persist the state's data)
        return StepFailed, (str(self), self.result)


def _task(t: Any, folder: ServiceFolder) -> Any:
    """A service task with its results stored in the service folder."""
    return in_run_dir(t, folder.root)


def _holder() -> str:
    """Who holds the lease: the flow run (so a Retry of the same run takes it back), else this process."""
    run_id = flow_run.get_id()
    return str(run_id) if run_id else f"pid-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def lease(folder: ServiceFolder, holder: str) -> Iterator[bool]:
    """Hold the service's lease (waiting up to lease.wait seconds) and renew it from a thread."""
    cfg, ledger = folder.cfg.lease, folder.ledger
    deadline = time.monotonic() + cfg.wait
    while ledger.try_lease(holder, cfg.timeout) is None:
        if time.monotonic() >= deadline:
            yield False
            return
        time.sleep(0.5)
    stop = threading.Event()

    def beat() -> None:
        beat_ledger = Ledger(folder.store)  # its own connection: a connection serves one thread
        while not stop.wait(max(cfg.timeout / 10, 0.5)):
            if not beat_ledger.heartbeat(holder):
                break
        beat_ledger.close()

    thread = threading.Thread(target=beat, name="service-lease", daemon=True)
    thread.start()
    try:
        yield True
    finally:
        stop.set()
        thread.join()
        ledger.release(holder)


# ---------------------------------------------------------------------------------------------
# Creating a service


@flow(name="rumflow-service-create", log_prints=True)
def service_create(service: str) -> dict[str, Any]:
    """Make version 0 of the service in `service` (trained by a cached task, or an experiment's model)."""
    folder = ServiceFolder.open(service)
    cfg, log = folder.cfg, get_run_logger()
    with service_root(folder.root):
        if cfg.version0.source == "train":
            events = cfg.proxy != "holdout_retraining"
            v0: ServiceModel = ensure(_task(train_version, folder), cfg.data, cfg.model, cfg.train, cfg.seed, [], events,
                               cfg.device, "v0")
            sha, origin = v0.sha256, "trained"
            if v0.events:
                write_text(v0.events, folder.root / "events.txt")
            log.info(f"version 0 trained in {v0.seconds:.1f}s: {sha[:12]}")
        else:
            sha = save(experiment_original(Path(cfg.version0.run), cfg.version0.seed, cfg.data, cfg.model))
            origin = f"experiment {Path(cfg.version0.run).resolve()} seed {cfg.version0.seed}"
            log.info(f"version 0 taken from {origin}: {sha[:12]}")
    fsync_dir(folder.models)
    folder.ledger.set_version0(sha, origin)
    return {"version": 0, "sha256": sha, "origin": origin}


def create_folder(cfg: ServiceConfig, root: Path) -> Path:
    """Write service.yaml in `root` and an empty ledger in the service's store (or reuse them when the
    same config is there and version 0 is not made yet, to finish an interrupted create)."""
    root = Path(root).expanduser().resolve()
    target = store_target(cfg.store.url, root)
    if (root / SERVICE_FILE).is_file() and Ledger.exists(target):
        folder = ServiceFolder.open(root)
        if folder.cfg.digest() != cfg.digest() or folder.ledger.meta("current_version") is not None:
            raise ConfigError(f"'{root}' already holds a service; choose another --dir or remove it.")
        return root
    if is_url(target) and Ledger.exists(target):  # checked before anything is written
        raise ConfigError(f"the database at {masked(target)} already holds a service; give each service its "
                          "own database (or schema), or drop its tables.")
    ids = dataset_on(cfg.data, "cpu").train.ids()  # the data loads before anything is written
    if cfg.version0.source == "experiment":  # and the experiment's model is the right one and intact
        experiment_original(Path(cfg.version0.run), cfg.version0.seed, cfg.data, cfg.model)
    root.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, ids)
    atomic_write_bytes(root / TRAIN_IDS, buf.getvalue())  # what `rumflow request add` validates against
    write_text(dump_service_config(cfg), root / SERVICE_FILE)
    Ledger.create(target, cfg.name, cfg.digest()).close()
    return root


# ---------------------------------------------------------------------------------------------
# One step


def _provenance(cfg: ServiceConfig) -> dict[str, Any]:
    return {"config_sha": cfg.digest(), "rumflow_version": rumflow.__version__, "torch_version": torch.__version__,
            "device": str(resolve_device(cfg.device)), "host": platform.node()}


def _memorization(folder: ServiceFolder, step: Step, log: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """(training ids, memorization in that order, seconds) of the proxy on the parent version."""
    import pandas as pd

    cfg = folder.cfg
    ids = dataset_on(cfg.data, cfg.device).train.ids()
    if cfg.proxy == "holdout_retraining":
        fut = _task(score_version, folder).submit(step.parent_sha256, cfg.proxy, cfg.data, cfg.model, cfg.holdout,
                                                  cfg.seed, cfg.device, f"v{step.parent}")
        scores = fut.result()
        if not scores.intact():
            scores = _task(score_version, folder).with_options(refresh_cache=True)(
                step.parent_sha256, cfg.proxy, cfg.data, cfg.model, cfg.holdout, cfg.seed, cfg.device, f"v{step.parent}")
        table, seconds = scores.load(), scores.seconds
    else:  # a learning-event proxy, recorded once while version 0 trained
        events = folder.root / (folder.root / "events.txt").read_text().strip()
        table, seconds = pd.read_parquet(events)[["example_id", cfg.proxy]].rename(columns={cfg.proxy: "score"}), 0.0
    values = table.set_index("example_id").loc[ids, "score"].to_numpy()
    return ids, memorization_of(cfg.proxy, values), seconds


def _unlearn(folder: ServiceFolder, step: Step, tiers: dict[str, list[int]], log: Any) -> tuple[str, float]:
    """Unlearn the tiers in order (low -> mid -> high) from the parent; (new digest, seconds)."""
    cfg = folder.cfg
    exclude = sorted(set(step.before) | set(step.example_ids))  # strict: no tier of the step is retained
    sha, seconds, previous = step.parent_sha256, 0.0, None
    for tier in TIERS:
        if not tiers[tier]:
            continue
        spec, seed = getattr(cfg.rum, tier), unlearn_seed(cfg.seed, step.step, tier)
        prep, prepared, wait = get_method(spec.method).prepare, None, [previous] if previous else None
        if prep is not None:
            p = _task(prepare_tier, folder).submit(sha, tiers[tier], exclude if prep.uses_retain else None, spec,
                                                   seed if prep.uses_seed else None, cfg.data, cfg.model, cfg.train,
                                                   cfg.device, step.label, tier, wait_for=wait)
            prepared, wait = p.result().sha256, [p]
        fut = _task(unlearn_tier, folder).submit(sha, tiers[tier], exclude, spec, seed, cfg.data, cfg.model,
                                                 cfg.train, cfg.device, step.label, tier, prepared=prepared,
                                                 wait_for=wait)
        done = fut.result()
        if not done.intact():
            done = _task(unlearn_tier, folder).with_options(refresh_cache=True)(
                sha, tiers[tier], exclude, spec, seed, cfg.data, cfg.model, cfg.train, cfg.device, step.label, tier,
                prepared=prepared)
        sha, seconds, previous = done.sha256, seconds + done.seconds, fut
        log.info(f"{step.label}/{tier}: {len(tiers[tier])} examples unlearned with {spec.method} in {done.seconds:.1f}s")
    return sha, seconds


def _evaluate(folder: ServiceFolder, step: Step, plan: StepPlan, sha: str) -> tuple[dict[str, float], dict[str, float]]:
    """Figures of the new version and of its parent on the same sets (two task runs, in parallel)."""
    cfg, t = folder.cfg, _task(evaluate_version, folder)
    new = t.submit(sha, plan, cfg.data, cfg.model, cfg.evaluate, cfg.seed, cfg.device, step.label)
    old = t.submit(step.parent_sha256, plan, cfg.data, cfg.model, cfg.evaluate, cfg.seed, cfg.device,
                   f"v{step.parent} (parent of {step.label})")
    return new.result(), old.result()


def _methods(cfg: ServiceConfig, tiers: dict[str, list[int]]) -> dict[str, Any]:
    return {t: {"method": getattr(cfg.rum, t).method, "params": getattr(cfg.rum, t).params.model_dump(mode="json"),
                "examples": len(tiers[t])} for t in TIERS}


def _publish(cfg: ServiceConfig, step: Step, version: int | None, promoted: bool, row: dict[str, Any],
             reason: str | None) -> None:
    """The step's table artifact: one row per request with the tiers, the figures and the gate verdicts."""
    figures = row.get("figures") or {}
    gates = {f"gate_{g['gate']}": "pass" if g["passed"] else "FAIL" for g in row.get("gates") or []}
    keep = ["acc_forget", "acc_test", "forget_p", "acc_retain", "retain_drop", "test_drop", "mia", "mia_heldout"]
    # verdicts first: the columns a reader needs fit the UI's width, the figures follow
    table = [{"request": rid, "examples": step.counts[rid], "parent": f"v{step.parent}",
              "version": f"v{version}" if version is not None else "none", "promoted": promoted, **gates,
              **{k: _cell(round(figures[k], 4)) for k in keep if k in figures},
              "tier_low": row.get("tier_low"), "tier_mid": row.get("tier_mid"), "tier_high": row.get("tier_high"),
              "seconds": round(row.get("seconds") or 0.0, 2), "reason": reason or ""}
             for rid in step.request_ids]
    create_table_artifact(table=table, key=artifact_key(cfg.name, "step", step.step),
                          description=f"service {cfg.name}, step {step.step}: requests {', '.join(step.request_ids)} "
                          f"-> {'v' + str(version) if version is not None else 'no version'} "
                          f"({'promoted' if promoted else 'not promoted'})", _sync=True)


def run_step(folder: ServiceFolder, step: Step, holder: str) -> dict[str, Any]:
    """Tier, unlearn, evaluate, gate and commit one step (everything before the commit is cached)."""
    cfg, log = folder.cfg, get_run_logger()
    start = time.perf_counter()
    total = 7
    progress = start_progress(artifact_key(cfg.name, "step", step.step), total,
                              f"step {step.step}: {len(step.example_ids)} examples of {len(step.request_ids)} "
                              "request(s)")
    ids, mem, seconds_proxy = _memorization(folder, step, log)
    advance_progress(progress, 1, total)
    pool = ~np.isin(ids, np.asarray(step.before, dtype=np.int64))
    tiers = partition_request(step.example_ids, ids[pool], mem[pool], cfg.tier_cuts)
    row: dict[str, Any] = {"proxy": cfg.proxy, "methods": _methods(cfg, tiers), "flow_run_id": holder,
                           **{f"tier_{t}": len(tiers[t]) for t in TIERS}, "seconds_proxy": seconds_proxy,
                           **_provenance(cfg)}
    log.info(f"step {step.step} ({'resumed' if step.resumed else 'new'}): requests {', '.join(step.request_ids)} on "
             f"v{step.parent}; tiers low {len(tiers['low'])} mid {len(tiers['mid'])} high {len(tiers['high'])}")
    try:
        sha, seconds_unlearn = _unlearn(folder, step, tiers, log)
    except DivergenceError as exc:  # seeded, so a rerun would diverge again: the requests fail with the reason
        reason = f"unlearning diverged: {exc}"
        row.update(seconds=time.perf_counter() - start, gates=[], figures={}, gates_passed=0)
        folder.ledger.commit_step(step, None, False, reason, row, holder)
        _publish(cfg, step, None, False, row, reason)
        log.error(reason)
        return {"status": "failed", "step": step.step, "reason": reason}
    advance_progress(progress, 4, total)
    plan = StepPlan(step=step.step, before=step.before, **tiers)
    new, prev = _evaluate(folder, step, plan, sha)
    advance_progress(progress, 6, total)
    figures = {**{k: v for k, v in new.items() if k != "seconds_evaluate"},
               "acc_retain_prev": prev["acc_retain"], "acc_test_prev": prev["acc_test"],
               "acc_forget_prev": prev["acc_forget"], "mia_prev": prev["mia"],
               **derived_figures(new, prev, len(step.example_ids))}
    verdicts = apply_gates(figures, cfg.gates)
    reason = gate_failure(verdicts)
    promote = reason is None
    load_state(sha)  # the weights are on disk and match their digest before the commit names them
    fsync_dir(folder.models)
    seconds_evaluate = new["seconds_evaluate"] + prev["seconds_evaluate"]
    # compute seconds of the step's tasks (a resumed step's cached tasks report their first run's time)
    row.update(figures={**figures, "seconds_wall_this_run": time.perf_counter() - start}, gates=verdicts,
               gates_passed=int(promote), seconds_unlearn=seconds_unlearn, seconds_evaluate=seconds_evaluate,
               seconds=seconds_proxy + seconds_unlearn + seconds_evaluate)
    version = folder.ledger.commit_step(step, sha, promote, reason, row, holder)
    advance_progress(progress, total, total)
    _publish(cfg, step, version, promote, row, reason)
    verdict = "promoted" if promote else "kept, not promoted: " + reason
    log.info(f"step {step.step}: v{version} ({sha[:12]}) {verdict} | forget acc {figures['acc_forget']:.3f} vs test "
             f"{figures['acc_test']:.3f} (p {figures['forget_p']:.3f}) | retain {figures['acc_retain']:.3f} "
             f"(was {figures['acc_retain_prev']:.3f}) | MIA {figures['mia']:.3f}")
    return {"status": "done" if promote else "failed", "step": step.step, "version": version, "sha256": sha,
            "promoted": promote, "requests": step.request_ids, "reason": reason}


def run_audit(folder: ServiceFolder, holder: str) -> dict[str, Any]:
    """Retrain from scratch without every forgotten example; ToW / ToW-MIA of the current version."""
    cfg, log = folder.cfg, get_run_logger()
    version, sha = folder.ledger.current()
    forgotten = folder.ledger.forgotten()
    reference: ServiceModel = ensure(_task(train_version, folder), cfg.data, cfg.model, cfg.train, cfg.seed, forgotten,
                              False, cfg.device, f"audit v{version} (minus {len(forgotten)})")
    plan = StepPlan(step=0, low=[], mid=forgotten, high=[], before=[])
    t = _task(evaluate_version, folder)
    cur = t.submit(sha, plan, cfg.data, cfg.model, cfg.evaluate, cfg.seed, cfg.device, f"v{version} (audit)")
    ref = t.submit(reference.sha256, plan, cfg.data, cfg.model, cfg.evaluate, cfg.seed, cfg.device,
                   f"retrain reference of v{version}")
    u, r = cur.result(), ref.result()
    figures = {**{f"{k}": u[k] for k in ("acc_forget", "acc_retain", "acc_test", "mia")},
               **{f"{k}_reference": r[k] for k in ("acc_forget", "acc_retain", "acc_test", "mia")},
               "tow": float(tow(u["acc_forget"], u["acc_retain"], u["acc_test"], r["acc_forget"], r["acc_retain"],
                                r["acc_test"])) if forgotten else float("nan"),
               "tow_mia": float(tow_mia(u["mia"], u["acc_retain"], u["acc_test"], r["mia"], r["acc_retain"],
                                        r["acc_test"])) if forgotten else float("nan")}
    folder.ledger.add_audit(version, sha, reference.sha256, len(forgotten), figures, reference.seconds, holder)
    create_table_artifact(table=[{"version": f"v{version}", "forgotten": len(forgotten),
                                  **{k: _cell(round(v, 4)) for k, v in figures.items()}}],
                          key=artifact_key(cfg.name, "audit", f"v{version}"),
                          description=f"service {cfg.name}: audit of v{version} against a retrain reference", _sync=True)
    log.info(f"audit of v{version}: ToW {figures['tow']:.3f}, ToW-MIA {figures['tow_mia']:.3f} "
             f"({len(forgotten)} forgotten, retrain {reference.seconds:.1f}s)")
    return {"status": "audited", "version": version, **figures}


@flow(name="rumflow-service-step", log_prints=True)
def service_step(service: str) -> dict[str, Any]:
    """Process the queued requests of the service in `service` as one step (or finish at once). A step
    whose requests fail (a gate missed, a divergence) ends Failed, with the reason, after its commit."""
    folder = ServiceFolder.open(service)
    cfg, log, holder = folder.cfg, get_run_logger(), _holder()
    with lease(folder, holder) as held:
        if not held:
            who = folder.ledger.lease_holder() or {}
            log.warning(f"another run ({who.get('holder', '?')}, pid {who.get('pid', '?')} on {who.get('host', '?')}) "
                        f"holds service {cfg.name}; this run finishes without work")
            return {"status": "busy"}
        step = folder.ledger.open_step(cfg.batch, holder)
        if step is None:
            log.info(f"service {cfg.name}: no queued request")
            return {"status": "idle"}
        with service_root(folder.root):
            result = run_step(folder, step, holder)
            if result.get("promoted") and cfg.audit.every and folder.ledger.promoted_since_audit() >= cfg.audit.every:
                result["audit"] = run_audit(folder, holder)
    if result["status"] == "failed":
        # committed already (version kept, requests failed, no longer queued): the run shows Failed with the
        # reason in the UI, and a Retry of it finds nothing to do
        return Failed(message=result["reason"], data=StepFailed(result["reason"], result))
    return result


@flow(name="rumflow-service-audit", log_prints=True)
def service_audit(service: str) -> dict[str, Any]:
    """Audit the current version of the service in `service` against a retrain reference."""
    folder = ServiceFolder.open(service)
    holder = _holder()
    with lease(folder, holder) as held:
        if not held:
            raise ConfigError(f"another run holds service {folder.cfg.name}; audit again when it has finished.")
        with service_root(folder.root):
            return run_audit(folder, holder)
