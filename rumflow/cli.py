"""The `rumflow` command: run | memorization | report | verify | methods.

Prefect reads its settings when it is imported, so everything Prefect-related is imported only after
`_prefect_environment` has set them, and bad input is rejected before that, with one sentence and exit
status 2 (no server, no training): the config (unknown keys, booleans where numbers go, non-finite
numbers, negative seeds), the device, the data files, the output folder (a file, read-only, unwritable,
full), a Prefect server that does not answer, and a run folder held by another live run.

Stopping: SIGTERM (what `timeout`, systemd and Kubernetes send) is handled like Ctrl-C. The first signal
raises KeyboardInterrupt in the main thread; the flow unwinds (Prefect marks its run Crashed), the resume
hint is printed, the embedded Prefect server (`SubprocessASGIServer`, a child process), Ray and every
other child process are stopped, and the process exits (130 for SIGINT, 143 for SIGTERM) without waiting
for task threads that are still computing. If unwinding takes longer than STOP_GRACE seconds (a task
runner waiting for its threads), a watchdog does the same from its own thread.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from rumflow.errors import RumflowError

RESUME_HINT = "rumflow: interrupted; run the same command again to resume from the cache."
STOP_GRACE = 4.0  # seconds between the first SIGTERM/SIGINT and a forced exit


# ---------------------------------------------------------------------------------------------- Prefect

def _prefect_environment(verbose: bool = False) -> None:
    """Offline-friendly Prefect settings, unless the user set them (PREFECT_API_URL is honoured).
    Task-run log lines (WARNING and above by default) are all shown with --verbose."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if verbose:  # --verbose wins over a level set in the environment
        os.environ["PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL"] = "INFO"
    else:
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")


def _task_log_level(verbose: bool) -> None:
    """The task-run logger's level, also when Prefect was imported before the environment was set."""
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("prefect.task_runs").setLevel(level)


def _check_api() -> None:
    """A PREFECT_API_URL the user set must answer before any work starts."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=10).raise_for_status()
    except Exception as exc:  # connection refused, timeout, HTTP error: all mean "no usable server"
        raise RumflowError(f"the Prefect server at PREFECT_API_URL={url} does not answer ({type(exc).__name__}); "
                           "start it (prefect server start) or unset PREFECT_API_URL to use an embedded "
                           "one.") from None


def _run_flow(flow_fn, cfg, out: str, held) -> Path:
    """Run a flow; before returning, let the API record every task run's final state (the embedded
    server stops with this process, and would drop the events still in flight). As soon as the flow
    runs (the API is up), its id is written into the run folder's lock, so that a later run can mark it
    Crashed if this process is killed, and the flow run of a killed earlier run is marked Crashed."""
    def record_id(flow, flow_run, state) -> None:
        held.set_flow_run(str(flow_run.id))
        _mark_stale_run(held)

    flow_fn = flow_fn.with_options(on_running=[*flow_fn.on_running_hooks, record_id])
    state = flow_fn(cfg, out=out, return_state=True)
    # a failed run leaves task runs that never become final (NotReady): do not wait the whole timeout
    _wait_for_records(state.state_details.flow_run_id, timeout=30.0 if state.is_completed() else 3.0)
    return Path(state.result())


def _is_user_error(exc: BaseException | None) -> bool:
    """An error that is told in one sentence (a RumflowError, a full disk, a read-only folder)."""
    from rumflow.artifacts.tables import write_error

    return isinstance(exc, RumflowError) or (isinstance(exc, OSError) and write_error(exc) is not None)


class _OneSentence(logging.Filter):
    """On the console, a task or flow that failed with a user error is logged without its traceback
    (the error's sentence ends the output; the API, and so the UI, still gets the traceback)."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not _is_user_error(exc):
            return True
        # a copy: the same record object may still reach other handlers
        self.handler.handle(logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None}))
        return False


def _quiet_user_tracebacks() -> None:
    """Add _OneSentence to the console handlers Prefect configured (on the root logger)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not any(isinstance(f, _OneSentence)
                                                                  for f in handler.filters):
            handler.addFilter(_OneSentence(handler))


def _wait_for_records(flow_run_id, timeout: float = 30.0) -> None:
    """Poll until every task run of the flow run and of its subflow runs is recorded in a final state
    (or `timeout` passes)."""
    from prefect.client.orchestration import get_client

    from rumflow.artifacts.runfolder import flow_run_tree
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter,
                                                TaskRunFilterState, TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all()
    final = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
        any_=[StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED])))
    deadline, last = time.monotonic() + timeout, (-1, -1)

    def count(client, task_filter=None) -> int:
        body = {"flow_runs": runs.model_dump(mode="json", exclude_unset=True)}
        if task_filter is not None:
            body["task_runs"] = task_filter.model_dump(mode="json", exclude_unset=True)
        response = client.request("POST", "/task_runs/count", json=body)
        response.raise_for_status()
        return int(response.json())

    with get_client(sync_client=True) as client:
        runs = FlowRunFilter(id=FlowRunFilterId(any_=flow_run_tree(client, flow_run_id)))
        while time.monotonic() < deadline:
            counts = (count(client), count(client, final))
            if counts[0] == counts[1] and counts == last:
                return
            last = counts
            time.sleep(0.5)


def _mark_stale_run(held) -> None:
    """Mark the flow run of a killed earlier run in this folder Crashed (best effort: the API is up now)."""
    if held.stale is None or not held.stale.flow_run_id or _STOPPING.is_set():
        return
    from rumflow.artifacts import runfolder

    try:
        runfolder.mark_crashed(held.stale.flow_run_id)
    except Exception as exc:  # the record is only bookkeeping: never fail a finished run over it
        print(f"rumflow: note: could not mark the killed run's flow run {held.stale.flow_run_id} Crashed "
              f"({type(exc).__name__}).", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- commands

def _checked_config(args: argparse.Namespace):
    """Load and validate the config, check the output folder, the device and the data, before any
    expensive work; returns (config, run folder)."""
    from rumflow.artifacts.runfolder import check_writable
    from rumflow.config import load_config
    from rumflow.runtime import check_feasible

    cfg = load_config(args.config, args.set)
    _prefect_environment(getattr(args, "verbose", False))  # only sets variables: nothing imports Prefect yet
    run_dir = Path(args.out).expanduser().resolve() / cfg.name
    check_writable(run_dir)
    check_feasible(cfg)
    _check_runner(cfg)
    _check_api()
    return cfg, run_dir


def _check_runner(cfg) -> None:
    """The task runner's optional package (Ray, Dask) is installed."""
    try:
        from rumflow.flows.runners import check_runner
    except ImportError:
        return
    check_runner(cfg.runner)


def _run_in_folder(args: argparse.Namespace, flow_name: str) -> Path:
    """Hold the run folder, then run the flow `flow_name` (experiment | memorization) into it."""
    from rumflow.artifacts import runfolder

    cfg, run_dir = _checked_config(args)
    with runfolder.hold(run_dir, cfg.digest(), cfg.name) as held:
        if flow_name == "experiment":
            from rumflow.flows import experiment as module

            flow_fn = module.configured(cfg) if hasattr(module, "configured") else module.experiment
        else:
            from rumflow.flows.memorization import memorization as flow_fn
        _task_log_level(args.verbose)
        _quiet_user_tracebacks()
        run_dir = _run_flow(flow_fn, cfg, str(args.out), held)
    return run_dir


def cmd_run(args: argparse.Namespace) -> int:
    """Run (or resume) the experiment and print its summary."""
    run_dir = _run_in_folder(args, "experiment")
    print(summary_text(run_dir))
    print(f"\nResults: {run_dir}")
    return 0


def summary_text(run_dir: Path) -> str:
    """The end-of-run table (last step, mean and 95% interval over seeds), as in summary.md."""
    from rumflow.artifacts.report import final_step_table
    from rumflow.artifacts.tables import read_parquet

    return final_step_table(read_parquet(run_dir / "summary.parquet"))


def _report_inputs_intact(run_dir: Path) -> dict:
    """The folder's manifest, once the run is known complete and every file the report reads matches it
    (the report's own outputs may differ: it rewrites them)."""
    from rumflow.artifacts import runfolder
    from rumflow.artifacts.report import is_report_output

    manifest = runfolder.check_complete(run_dir)
    problems = runfolder.output_problems(run_dir, manifest, skip=is_report_output)
    if problems:
        more = f" ({len(problems)} problems; rumflow verify {run_dir} lists them)" if len(problems) > 1 else ""
        raise RumflowError(f"refusing to report: {problems[0].rstrip('.')}{more}.")
    return manifest


def cmd_report(args: argparse.Namespace) -> int:
    """Regenerate summary.parquet, summary.md and the figures from a run folder's Parquet files."""
    from rumflow.artifacts import runfolder
    from rumflow.artifacts.report import build_report
    from rumflow.errors import DataError

    run_dir = Path(args.run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise DataError(f"'{run_dir}' is not a folder; give the folder of a finished run (<out>/<name>/).")
    if not (run_dir / "steps.parquet").is_file():
        raise DataError(f"'{run_dir}' holds no steps.parquet; give the folder of a finished run "
                        "(<out>/<name>/).")
    manifest = _report_inputs_intact(run_dir)
    with runfolder.hold(run_dir, manifest["config_digest"], "report"):
        _report_inputs_intact(run_dir)  # again, now that no run can start in the folder
        written = build_report(run_dir)
        runfolder.refresh(run_dir, written)
    for path in written:
        print(path)
    print(summary_text(run_dir))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a run folder against its manifest, every checkpoint and scores file against its digest."""
    from rumflow.artifacts import runfolder

    run_dir = Path(args.run_dir).expanduser()
    problems = runfolder.verify(run_dir)
    if run_dir.is_dir():
        problems += _cache_problems(run_dir)
    for line in problems:
        print(line)
    if problems:
        return 1
    manifest = runfolder.read_manifest(run_dir)
    print(f"{run_dir}: intact ({len(manifest['outputs'])} outputs match {runfolder.MANIFEST}; every "
          "checkpoint and scores file matches its name).")
    return 0


def _cache_problems(run_dir: Path) -> list[str]:
    """Task records under cache/ that the next run would refuse (and recompute): a foreign serializer
    (a pickle), a body that does not match its digest, files they point at that changed."""
    cache = run_dir / "cache"
    records = [p for p in sorted(cache.iterdir()) if p.is_file() and not p.name.startswith(".")] \
        if cache.is_dir() else []
    if not records:
        return []
    _prefect_environment()
    try:
        from rumflow.tasks.records import check_record
    except ImportError:
        return []
    import importlib

    for module in ("rumflow.tasks.refs", "rumflow.tasks.report", "rumflow.tasks.service"):  # record types
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    problems = []
    for path in records:
        try:
            check_record(path.read_bytes(), run_dir.resolve())
        except Exception as exc:  # CorruptRecord, or JSON that is not a record at all
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            problems.append(f"cache/{path.name} is not a valid task record ({reason}); the next run recomputes "
                            "that task (or delete the file).")
    return problems


def cmd_memorization(args: argparse.Namespace) -> int:
    """Estimate true memorization and print how well each proxy agrees with it."""
    from rumflow.artifacts.tables import read_parquet

    run_dir = _run_in_folder(args, "memorization")
    import pandas as pd

    quality = read_parquet(run_dir / "proxies.parquet")
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(quality.drop(columns=["run", "config_sha"], errors="ignore").to_string(index=False))
    print(f"\nResults: {run_dir}/memorization.parquet, {run_dir}/proxies.parquet")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered unlearning methods and their hyperparameters."""
    from rumflow.methods.registry import describe_methods

    print(describe_methods())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rumflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML or JSON experiment config (default: the built-in digits demo)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set forget.steps=3 (repeatable)")

    run = sub.add_parser("run", help="run or resume an experiment")
    with_config(run)
    run.add_argument("--out", default="runs", help="parent folder of the run folder (default: runs)")
    run.add_argument("--verbose", action="store_true", help="show every task run's log lines")
    run.set_defaults(func=cmd_run)

    mem = sub.add_parser("memorization", help="estimate true memorization and grade the proxies against it")
    with_config(mem)
    mem.add_argument("--out", default="runs", help="parent folder of the run folder (default: runs)")
    mem.add_argument("--verbose", action="store_true", help="show every task run's log lines")
    mem.set_defaults(func=cmd_memorization)

    report = sub.add_parser("report", help="regenerate the summary and figures of a finished run")
    report.add_argument("run_dir", help="the run folder, <out>/<name>/")
    report.set_defaults(func=cmd_report)

    verify = sub.add_parser("verify", help="check a run folder against its manifest and every checkpoint "
                            "against its digest (exit 1 and one line per problem)")
    verify.add_argument("run_dir", help="the run folder, <out>/<name>/")
    verify.set_defaults(func=cmd_verify)

    methods = sub.add_parser("methods", help="list unlearning methods and their hyperparameters")
    methods.set_defaults(func=cmd_methods)

    # Other command groups register themselves here (one line each).
    from rumflow.service_cli import add_commands; add_commands(sub)  # noqa: E702 (service commands, issue 10)
    from rumflow.select_cli import add_commands as add_select; add_select(sub)  # noqa: E702 (issue 13)
    return parser


# ---------------------------------------------------------------------------------------------- stopping

_HANDLING = threading.Event()  # this process handles SIGTERM/SIGINT itself (a standalone run)
_STOPPING = threading.Event()  # a SIGTERM/SIGINT arrived: no new work, no bookkeeping, exit
_SHUTDOWN = threading.Lock()
_SIGNAL = {"number": None}


def _on_signal(signum: int, frame) -> None:
    """SIGTERM and SIGINT: the first raises KeyboardInterrupt in the main thread; later ones are ignored
    (the watchdog ends the process if unwinding stalls)."""
    if _STOPPING.is_set():
        return
    _SIGNAL["number"] = signum
    _STOPPING.set()
    raise KeyboardInterrupt


def _install_signal_handlers() -> None:
    """Handle SIGTERM like Ctrl-C, and arm a watchdog that sees every SIGTERM/SIGINT even while Prefect's
    flow engine has put its own SIGTERM handler in place (the C-level handler writes each signal's number
    to the wakeup fd whatever Python handler runs)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _HANDLING.set()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_watch_signals, args=(r,), daemon=True, name="rumflow-stop-watchdog").start()


def _watch_signals(fd: int) -> None:
    """Wait for the first SIGTERM/SIGINT; STOP_GRACE seconds later, end the process if it still runs."""
    wanted = {int(signal.SIGTERM), int(signal.SIGINT)}
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        seen = [b for b in data if b in wanted]
        if seen:
            break
    _SIGNAL["number"] = _SIGNAL["number"] or seen[0]
    _STOPPING.set()
    time.sleep(STOP_GRACE)
    _shutdown(_exit_status(), from_watchdog=True)


def _exit_status() -> int:
    return 128 + int(_SIGNAL["number"] or signal.SIGINT)


def _proc_children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (empty where there is no /proc)."""
    tree: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return tree
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int | None = None) -> list[int]:
    """Every process below `pid` (default: this one), children first."""
    tree, out, todo = _proc_children(), [], [pid or os.getpid()]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _reap() -> None:
    """Collect exited children, so none is left a zombie while this process still runs."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def stop_children(timeout: float = 3.0) -> None:
    """Stop what this process started: Ray (if used), the embedded Prefect server, then any other
    descendant process (SIGTERM, then SIGKILL after `timeout`)."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        t = threading.Thread(target=ray.shutdown, daemon=True)
        t.start()
        t.join(timeout)
    server = sys.modules.get("prefect.server.api.server")
    for instance in list(getattr(getattr(server, "SubprocessASGIServer", None), "_instances", {}).values()):
        proc = getattr(instance, "server_process", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except Exception:
                proc.kill()
        try:
            instance.stop()
        except Exception:
            pass
    rest = [p for p in descendants() if _alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in rest:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        while rest and time.monotonic() < deadline:
            _reap()
            rest = [p for p in rest if _alive(p)]
            time.sleep(0.05)
        if not rest:
            break
    _reap()


def _kill_descendants() -> None:
    """SIGKILL every process below this one at once (the last resort of a stop that hangs)."""
    for pid in descendants():
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _reap()


def _flush_prefect(timeout: float = 2.0) -> None:
    """Send the log lines and events still queued to the API (bounded: the server may be gone)."""
    for module, name in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        worker = getattr(sys.modules.get(module), name, None)
        if worker is None:
            continue
        t = threading.Thread(target=lambda w=worker: w.drain_all(timeout=timeout), daemon=True)
        t.start()
        t.join(timeout + 0.5)


def _bounded(fn, timeout: float) -> bool:
    """Run fn() on a daemon thread for at most `timeout` seconds; whether it finished without error."""
    done = threading.Event()

    def target() -> None:
        try:
            fn()
            done.set()
        except Exception:
            pass

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return done.is_set()


def _let_go_of_folders() -> None:
    """Folders still held (the main thread did not unwind in time): mark their flow runs Crashed while the
    server is still up, then remove their locks; where that fails, the lock stays, and the next run in the
    folder finds it stale and marks the flow run then."""
    runfolder = sys.modules.get("rumflow.artifacts.runfolder")
    if runfolder is None:
        return
    for held in runfolder.held_folders():
        run_id = held.info.flow_run_id
        if run_id and not _bounded(lambda: runfolder.mark_crashed(run_id, "stopped by SIGTERM or Ctrl-C"), 3.0):
            continue
        runfolder.release(held)


def _shutdown(status: int, from_watchdog: bool = False) -> None:
    """Print the resume hint, stop every child process and end the process now (task threads that
    are still computing are not waited for: their work is redone from the cache on resume)."""
    if not _SHUTDOWN.acquire(timeout=STOP_GRACE if from_watchdog else -1):
        _kill_descendants()  # the other thread's shutdown hangs: leave no child behind, and end regardless
        os._exit(status)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        pass  # not the main thread (the watchdog): the handlers ignore repeats anyway
    print(RESUME_HINT, file=sys.stderr, flush=True)
    try:
        _flush_prefect()
        _let_go_of_folders()
        _no_new_servers()
        stop_children()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        _kill_descendants()  # anything a background thread started meanwhile
        os._exit(status)


def _no_new_servers() -> None:
    """From here on, a Prefect client thread that still wants the API gets an error instead of a new
    embedded server (measured: a log flush after the stop started a second server that outlived us)."""
    server = sys.modules.get("prefect.server.api.server")
    cls = getattr(server, "SubprocessASGIServer", None)
    if cls is not None:
        def refuse(self, *args, **kwargs):
            raise RuntimeError("rumflow is stopping: no new embedded Prefect server")

        cls.start = refuse


def _is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, or Prefect's TerminationSignal (its SIGTERM handler inside a flow run)."""
    return isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TerminationSignal"


# ---------------------------------------------------------------------------------------------- entry

def main(argv: list[str] | None = None, standalone: bool | None = None) -> int:
    """Entry point; user errors print one line and exit with status 2. `standalone` (default: when
    called without arguments, as the `rumflow` command is): `run` and `memorization` handle SIGTERM like
    Ctrl-C and, on either, stop every child process and end the process (see the module docstring);
    in-process callers (tests) get status 130 and the hint."""
    from rumflow.artifacts.tables import write_error

    standalone = argv is None if standalone is None else standalone
    args = build_parser().parse_args(argv)
    if standalone and getattr(args, "func", None) in (cmd_run, cmd_memorization):
        _install_signal_handlers()  # other commands (the service's) keep Prefect's own signal handling
    try:
        return args.func(args)
    except RumflowError as exc:
        print(f"rumflow: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        mapped = write_error(exc)
        if mapped is None:
            raise
        print(f"rumflow: error: {mapped}", file=sys.stderr)
        return 2
    except BaseException as exc:
        if not _is_interrupt(exc):
            raise
        if _HANDLING.is_set():
            if exc.__class__.__name__ == "TerminationSignal":
                _SIGNAL["number"] = _SIGNAL["number"] or int(signal.SIGTERM)
            _shutdown(_exit_status())
        print(RESUME_HINT, file=sys.stderr)
        return 130
    finally:
        if _HANDLING.is_set() and not _STOPPING.is_set():
            stop_children()


if __name__ == "__main__":
    # `python -m rumflow.cli`: run the imported module's main, not this __main__ copy's, so that what the
    # flow holds (hooks, the run-folder lock) belongs to `rumflow.cli` and worker processes pickle it by
    # reference (a spawned process pool could not pickle __main__'s lock-holding closures by value).
    from rumflow.cli import main as _imported_main

    sys.exit(_imported_main())
