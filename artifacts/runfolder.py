"""A run folder that is always consistent and owned by one run at a time.

API (the experiment flow and the CLI call these; nothing here imports Prefect except `mark_crashed`):

``hold(run_dir: Path, config_digest: str, name: str) -> ContextManager[Held]``
    One run at a time per folder. Creates ``<run_dir>/.rumflow.lock`` (JSON: pid, host, boot id, process
    start time, start time, config digest, name, later the flow-run id) with O_EXCL, under a short
    ``flock`` of the folder so that two starters never race. Raises ``RunFolderBusy`` (one sentence: which
    run holds it, what to do) when a live process holds the folder; never waits for it. A lock left by a
    dead process (same host, and the pid is gone, a zombie, or reused by a process with another start
    time, or the machine rebooted) is stale: it is taken over and its holder's ``HolderInfo`` is given as
    ``Held.stale``, so that the caller can mark that run's flow run Crashed (``mark_crashed``). Nested
    holds of the same folder in the same process (the CLI holds it, then the flow) return the same
    ``Held``; a nested hold with another config digest raises ``RunFolderBusy``. The lock is removed when
    the outermost hold exits, whatever the exit (exception, Ctrl-C). A fresh (not nested) hold deletes the
    temporary files (``.*.tmp``) that interrupted writes of earlier runs left behind.

``Held.set_flow_run(flow_run_id)`` / ``set_flow_run(run_dir, flow_run_id)``
    Record the flow run id in the lock, so that a later run can mark it Crashed if this one is killed.

``mark_incomplete(run_dir)``
    Call at the start of every run, before writing anything: writes the ``INCOMPLETE`` marker first, then
    removes the previous ``manifest.json``. Until ``finish`` the folder says it is incomplete.

``finish(run_dir, config_yaml, outputs, config_digest) -> Path``
    Call after every output is written: writes ``config.yaml`` (only here: a failed run never rewrites
    it), then ``manifest.json`` last (each output's relative path, size and sha256, the config digest,
    the rumflow version, the time), then removes ``INCOMPLETE``. ``outputs`` are paths inside
    ``run_dir`` (absolute or relative to it); ``config.yaml`` is added by itself.

``verify(run_dir) -> list[str]``
    One line per problem (empty when the folder is intact): incomplete or missing manifest, an output
    missing or not matching its digest, rows of another config, files that are not part of the finished
    run, every ``checkpoints/<digest>.pt`` whose content does not match its name, every
    ``scores/<name>-<digest16>.parquet`` whose content digest is not the one in its name (digest =
    sha256 of ``pandas.util.hash_pandas_object(df, index=False)``, first 16 hex), checkpoints named in
    ``steps.parquet`` that are missing, unreadable Parquet, leftover temporary files. Other modules may add
    checks with ``register_check(fn)`` (``fn(run_dir) -> list[str]``), e.g. for cache records.

``refresh(run_dir, outputs) -> Path``
    Re-record outputs rewritten after ``finish`` (``rumflow report``) in the manifest, keeping the rest.

``read_manifest(run_dir) -> dict`` / ``output_problems(run_dir, manifest, skip=...) -> list[str]``
    The manifest (``RunFolderError`` when missing or unreadable); the outputs that no longer match it.

``checkpoint_problem(path)`` / ``scores_problem(path)`` / ``scores_digest(df)``
    The per-file checks ``verify`` runs (``None`` when the file holds what its name says), usable on
    their own before a file is used.

``held_folders()`` / ``release(held)``
    The folders this process holds; let go of one at once (for a process that is about to end).

``check_complete(run_dir) -> dict``
    For readers such as ``rumflow report``: raises ``RunFolderError`` (one sentence) when the folder is
    incomplete or has no readable manifest; returns the manifest.

``check_writable(run_dir)``
    Before any work: ``OutputError`` when the folder (or the nearest existing folder above it) is a file,
    read-only, not writable, or on a full disk (probed by creating, writing and removing a temporary file).

``mark_crashed(flow_run_id, message=...) -> bool``
    Through the Prefect client (call it once the API is up, e.g. in the flow right after ``hold``): set the
    flow run to Crashed if it is not already in a final state. Returns whether it changed anything.
    Typical use in the flow::

        with runfolder.hold(run_dir, cfg.digest(), cfg.name) as held:
            if held.stale and held.stale.flow_run_id:
                runfolder.mark_crashed(held.stale.flow_run_id)
            held.set_flow_run(str(prefect.runtime.flow_run.id))
            runfolder.mark_incomplete(run_dir)
            ... write outputs ...
            runfolder.finish(run_dir, dump_config(cfg), outputs, cfg.digest())
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from rumflow.artifacts.tables import TEMP_SUFFIX, atomic_write_bytes, write_error, write_text
from rumflow.errors import OutputError, RunFolderBusy, RunFolderError

LOCK = ".rumflow.lock"
MARKER = "INCOMPLETE"
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
MANIFEST_FORMAT = 1
GUARD_TIMEOUT = 10.0  # seconds a starter waits for another starter's few-millisecond critical section
_OWN_FILES = {LOCK, MARKER, MANIFEST}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SCORES = re.compile(r"^(?P<name>.+)-(?P<digest>[0-9a-f]{16})$")
_MARKER_TEXT = ("This run folder is incomplete: a run is in progress here, or it stopped before finishing.\n"
                "Run the same command again to complete it; manifest.json is written when it does.\n")


# ---------------------------------------------------------------------------------------------- locking

@dataclass(frozen=True)
class HolderInfo:
    """Who holds (or held) a run folder: what the lock file records."""

    pid: int
    host: str
    boot_id: str | None
    process_start: str | None  # the kernel's start time of `pid` (clock ticks since boot), Linux only
    started_at: str
    config_digest: str
    name: str
    flow_run_id: str | None = None

    def describe(self) -> str:
        """'pid 123 on host h, started 2026-..., config ab12cd34ef56, flow run <id>'."""
        run = f", flow run {self.flow_run_id}" if self.flow_run_id else ""
        return (f"run '{self.name}' (pid {self.pid} on {self.host}, started {self.started_at}, config "
                f"{self.config_digest[:12]}{run})")


@dataclass
class Held:
    """A held run folder: this run's lock, and the stale holder it replaced (if any)."""

    run_dir: Path
    info: HolderInfo
    stale: HolderInfo | None = None
    depth: int = field(default=1, repr=False)

    def set_flow_run(self, flow_run_id: str) -> None:
        """Record the flow run id in the lock file."""
        set_flow_run(self.run_dir, flow_run_id)


_HELD: dict[Path, Held] = {}
_HELD_LOCK = threading.RLock()


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of `pid` from /proc, or None where /proc cannot tell."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


def _this_holder(config_digest: str, name: str) -> HolderInfo:
    stat = _proc_stat(os.getpid())
    return HolderInfo(pid=os.getpid(), host=socket.gethostname(), boot_id=_boot_id(),
                      process_start=stat[1] if stat else None,
                      started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      config_digest=config_digest, name=name)


def _is_ours(info: HolderInfo) -> bool:
    me = _this_holder(info.config_digest, info.name)
    return (info.pid, info.host, info.process_start) == (me.pid, me.host, me.process_start)


def holder_alive(info: HolderInfo) -> bool:
    """Whether the process that wrote the lock may still run (another host: assumed alive)."""
    if info.host != socket.gethostname():
        return True
    boot = _boot_id()
    if info.boot_id and boot and info.boot_id != boot:
        return False  # the machine rebooted since
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _proc_stat(info.pid)
    if stat is None:
        return True
    state, start = stat
    if state in ("Z", "X"):
        return False
    return info.process_start is None or start == info.process_start  # else the pid was reused


def read_lock(run_dir: Path) -> HolderInfo | None:
    """The holder recorded in the folder's lock file; None when there is none or it is unreadable."""
    try:
        data = json.loads((Path(run_dir) / LOCK).read_text())
        return HolderInfo(**{k: data.get(k) for k in HolderInfo.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def _guard(run_dir: Path) -> Iterator[None]:
    """A short exclusive flock on the folder itself (released by the kernel if the process dies)."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        deadline = time.monotonic() + GUARD_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RunFolderBusy(f"run folder {run_dir} is being claimed by another rumflow process "
                                        "that does not let go; check for a hung rumflow and stop it.") from None
                time.sleep(0.02)
            except OSError:
                break  # the file system has no flock: the O_EXCL creation still keeps one holder
        yield
    finally:
        os.close(fd)


def _write_lock(run_dir: Path, info: HolderInfo, exclusive: bool) -> None:
    """Write the lock file: created with O_EXCL, or (taking over / updating) replaced atomically."""
    body = (json.dumps(asdict(info), indent=1) + "\n").encode()
    path = run_dir / LOCK
    if not exclusive:
        atomic_write_bytes(path, body)
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise RunFolderBusy(f"run folder {run_dir} was claimed by another run at the same moment; "
                            "wait for it to finish or choose another --out or name.") from None
    except OSError as exc:
        raise (write_error(exc, path) or exc) from exc
    try:
        os.write(fd, body)
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise (write_error(exc, path) or exc) from exc
    os.close(fd)


def _busy(run_dir: Path, other: HolderInfo) -> RunFolderBusy:
    remote = (f"; if that run is no longer alive, delete {run_dir / LOCK}" if other.host != socket.gethostname()
              else "")
    return RunFolderBusy(f"run folder {run_dir} is in use by {other.describe()}; wait for it to finish or stop "
                         f"it, or choose another --out or name{remote}.")


def _sweep_temporaries(run_dir: Path) -> None:
    """Delete the temporary files interrupted writes left (only while holding the folder)."""
    for tmp in run_dir.rglob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if tmp.is_file():
                tmp.unlink()


def _acquire(run_dir: Path, config_digest: str, name: str) -> Held:
    with _HELD_LOCK:
        held = _HELD.get(run_dir)
        if held is not None:
            if held.info.config_digest != config_digest:
                raise RunFolderBusy(f"run folder {run_dir} is already held by this process for config "
                                    f"{held.info.config_digest[:12]}; finish that run before starting config "
                                    f"{config_digest[:12]} in the same folder.")
            held.depth += 1
            return held
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise (write_error(exc, run_dir / LOCK) or exc) from exc
        me = _this_holder(config_digest, name)
        with _guard(run_dir):
            stale = None
            if (run_dir / LOCK).exists():
                other = read_lock(run_dir)
                if other is not None and holder_alive(other) and not _is_ours(other):
                    raise _busy(run_dir, other)
                # dead holder (or an unreadable lock no live run could have written): take it over
                stale = None if other is not None and _is_ours(other) else other
                _write_lock(run_dir, me, exclusive=False)
            else:
                _write_lock(run_dir, me, exclusive=True)
            _sweep_temporaries(run_dir)
        held = Held(run_dir, me, stale)
        _HELD[run_dir] = held
        return held


def _release(held: Held, force: bool = False) -> None:
    with _HELD_LOCK:
        held.depth = 0 if force else held.depth - 1
        if held.depth > 0:
            return
        _HELD.pop(held.run_dir, None)
        with contextlib.suppress(OSError), _guard(held.run_dir):
            current = read_lock(held.run_dir)
            if current is not None and _is_ours(current):
                (held.run_dir / LOCK).unlink(missing_ok=True)


@contextlib.contextmanager
def hold(run_dir: Path, config_digest: str, name: str) -> Iterator[Held]:
    """Hold `run_dir` for one run (see the module docstring); RunFolderBusy if a live run holds it."""
    held = _acquire(Path(run_dir).expanduser().resolve(), config_digest, name)
    try:
        yield held
    finally:
        _release(held)


def set_flow_run(run_dir: Path, flow_run_id: str) -> None:
    """Record the flow run id in the lock this process holds on `run_dir`."""
    run_dir = Path(run_dir).expanduser().resolve()
    with _HELD_LOCK:
        held = _HELD.get(run_dir)
        if held is None:
            raise RunFolderError(f"run folder {run_dir} is not held by this process; call hold() first.")
        held.info = replace(held.info, flow_run_id=str(flow_run_id))
        with _guard(run_dir):
            _write_lock(run_dir, held.info, exclusive=False)


def held_folders() -> list[Held]:
    """The run folders this process holds now."""
    with _HELD_LOCK:
        return list(_HELD.values())


def release(held: Held) -> None:
    """Let go of `held` now, however deeply it is nested (for a process that is about to end)."""
    _release(held, force=True)


def flow_run_tree(client: Any, root: Any) -> list[Any]:
    """The ids of a flow run and of every subflow run below it (the experiment's chains and steps)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    ids, frontier = [root], [root]
    while frontier:
        flt = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
        frontier = []
        while True:
            page = client.read_flow_runs(flow_run_filter=flt, limit=200, offset=len(frontier))
            frontier += [r.id for r in page]
            if len(page) < 200:
                break
        ids += frontier
    return ids


def mark_crashed(flow_run_id: str, message: str = "its process died (found by the next run in the same "
                 "folder)") -> bool:
    """Set a flow run that is still Running (or Pending) to Crashed through the Prefect API, and so its
    subflow runs (the chains and steps a killed process left Running)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return False
        if run.state is not None and run.state.is_final():
            return False
        for sub in flow_run_tree(client, run.id)[1:]:
            state = client.read_flow_run(sub).state
            if state is None or not state.is_final():
                client.set_flow_run_state(sub, Crashed(message=message), force=True)
        client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
        return True


# ---------------------------------------------------------------------------------------------- writing

def check_writable(run_dir: Path) -> None:
    """OutputError (one sentence) unless files can be created in `run_dir` (or where it will be created)."""
    run_dir = Path(run_dir).expanduser().absolute()
    probe = run_dir
    while not probe.exists():
        if probe.is_symlink():
            raise OutputError(f"{probe} is a broken symbolic link; fix it or choose another --out folder.")
        probe = probe.parent
    if not probe.is_dir():
        what = "--out" if probe != run_dir else "the run folder"
        raise OutputError(f"{probe} is a file, not a folder, so {what} cannot go there; give --out a folder "
                          "(it is created when missing).")
    folders = [probe] + ([p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
                         if probe == run_dir else [])
    for folder in folders:
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".rumflow-probe.", suffix=TEMP_SUFFIX)
            try:
                os.write(fd, b"rumflow")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(tmp)
        except OSError as exc:
            mapped = write_error(exc, folder / "a new file") or OutputError(
                f"cannot create files in {folder} ({exc.strerror}); choose another --out folder.")
            raise mapped from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mark_incomplete(run_dir: Path) -> None:
    """Mark the folder incomplete (marker first), then drop the manifest of the previous run."""
    run_dir = Path(run_dir)
    write_text(_MARKER_TEXT, run_dir / MARKER)
    (run_dir / MANIFEST).unlink(missing_ok=True)


def _relative(run_dir: Path, path: Path) -> str:
    full = (run_dir / path) if not path.is_absolute() else path
    try:
        return full.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"output {path} is not inside the run folder {run_dir}") from None


def finish(run_dir: Path, config_yaml: str, outputs: list[Path], config_digest: str) -> Path:
    """Write config.yaml, then manifest.json (last), then remove the INCOMPLETE marker; returns the manifest."""
    run_dir = Path(run_dir)
    write_text(config_yaml, run_dir / CONFIG)
    names = sorted({_relative(run_dir, Path(p)) for p in outputs} | {CONFIG})
    path = _write_manifest(run_dir, [_entry(run_dir, rel) for rel in names], config_digest)
    (run_dir / MARKER).unlink(missing_ok=True)
    return path


def _entry(run_dir: Path, rel: str) -> dict[str, Any]:
    path = run_dir / rel
    if not path.is_file():
        raise RunFolderError(f"output {path} is missing, so the run cannot be finished; re-run the same "
                             "command.")
    return {"path": rel, "size": path.stat().st_size, "sha256": _sha256(path)}


def _write_manifest(run_dir: Path, entries: list[dict[str, Any]], config_digest: str) -> Path:
    import rumflow

    manifest = {"format": MANIFEST_FORMAT, "config_digest": config_digest,
                "rumflow_version": rumflow.__version__,
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "outputs": sorted(entries, key=lambda e: e["path"])}
    return write_text(json.dumps(manifest, indent=1) + "\n", run_dir / MANIFEST)


def refresh(run_dir: Path, outputs: list[Path]) -> Path:
    """Re-record `outputs` (rewritten by a later step such as `rumflow report`) in a complete folder's
    manifest, keeping every other entry and the config digest."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    fresh = {_relative(run_dir, Path(p)) for p in outputs}
    entries = [e for e in manifest["outputs"] if e["path"] not in fresh]
    entries += [_entry(run_dir, rel) for rel in sorted(fresh)]
    return _write_manifest(run_dir, entries, manifest["config_digest"])


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The folder's manifest; RunFolderError when it is missing or unreadable."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise RunFolderError(f"{path} is missing, so the run in {run_dir} never finished; run the same command "
                             "again to complete it.")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("outputs"), list):
            raise ValueError("no outputs list")
        for entry in data["outputs"]:
            if not {"path", "size", "sha256"} <= set(entry):
                raise ValueError("an entry lacks path, size or sha256")
        return data
    except (OSError, ValueError, TypeError) as exc:
        raise RunFolderError(f"{path} is not a readable manifest ({exc}); run the same command again to "
                             "rewrite it.") from None


def check_complete(run_dir: Path) -> dict[str, Any]:
    """Refuse (RunFolderError, one sentence) a folder whose run has not finished; return its manifest."""
    run_dir = Path(run_dir)
    if (run_dir / MARKER).exists():
        holder = read_lock(run_dir)
        doing = (f"{holder.describe()} is still working in it" if holder and holder_alive(holder)
                 and not _is_ours(holder) else "its last run did not finish")
        raise RunFolderError(f"run folder {run_dir} is incomplete ({doing}); run the same command again to "
                             "complete it before using its results.")
    return read_manifest(run_dir)


# ---------------------------------------------------------------------------------------------- verifying

Check = Callable[[Path], list[str]]
_CHECKS: list[Check] = []


def register_check(fn: Check) -> Check:
    """Add a check to `verify` (e.g. of cache records): fn(run_dir) -> one line per problem."""
    _CHECKS.append(fn)
    return fn


def scores_digest(df) -> str:
    """The content digest that names a scores file (first 16 hex of sha256 of the row hashes)."""
    import pandas as pd

    return hashlib.sha256(pd.util.hash_pandas_object(df, index=False).values.tobytes()).hexdigest()[:16]


def _parquet_problem(path: Path) -> tuple[str | None, Any]:
    """(problem or None, the table when readable)."""
    from rumflow.errors import DataError
    from rumflow.artifacts.tables import read_parquet

    try:
        return None, read_parquet(path)
    except DataError as exc:
        return str(exc), None


def _check_manifest(run_dir: Path) -> tuple[list[str], dict[str, Any] | None]:
    problems: list[str] = []
    if (run_dir / MARKER).exists():
        holder = read_lock(run_dir)
        if holder and holder_alive(holder) and not _is_ours(holder):
            problems.append(f"a run is in progress in {run_dir}: {holder.describe()}; verify it after it ends.")
        else:
            problems.append(f"{run_dir} is incomplete ({MARKER} is present: its last run did not finish); run "
                            "the same command again to complete it.")
    try:
        manifest = read_manifest(run_dir)
    except RunFolderError as exc:
        if not (run_dir / MARKER).exists():
            problems.append(str(exc))
        return problems, None
    return problems + output_problems(run_dir, manifest), manifest


def output_problems(run_dir: Path, manifest: dict[str, Any],
                    skip: Callable[[str], bool] = lambda rel: False) -> list[str]:
    """One line per output of the manifest that is missing or does not match its size and sha256
    (outputs whose relative path `skip` accepts are not checked)."""
    problems = []
    for entry in manifest["outputs"]:
        if skip(entry["path"]):
            continue
        path = Path(run_dir) / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']} is listed in {MANIFEST} but missing; re-run the same command to "
                            "write it again.")
        elif path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            problems.append(f"{entry['path']} does not match its sha256 in {MANIFEST} (changed or corrupted since "
                            "the run finished); re-run the same command to rewrite it.")
    return problems


def _unlisted(run_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Outputs beside the finished run's that it did not write (e.g. from a run of another config)."""
    listed = {e["path"] for e in manifest["outputs"]}
    candidates = [p for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    if (run_dir / "figures").is_dir():
        candidates += [p for p in (run_dir / "figures").iterdir() if p.is_file() and not p.name.startswith(".")]
    return [f"{p.relative_to(run_dir).as_posix()} is not part of the finished run (not in {MANIFEST}); it is "
            "left from another run: delete it." for p in sorted(candidates)
            if p.name not in _OWN_FILES and p.relative_to(run_dir).as_posix() not in listed]


def _check_tables(run_dir: Path, manifest: dict[str, Any] | None) -> list[str]:
    """Top-level Parquet outputs: readable, rows of the manifest's config, their checkpoints present."""
    problems = []
    for path in sorted(run_dir.glob("*.parquet")):
        problem, df = _parquet_problem(path)
        if problem:
            problems.append(problem)
            continue
        if manifest is not None and "config_sha" in df.columns:
            other = sorted(set(map(str, df["config_sha"].dropna().unique())) - {manifest["config_digest"]})
            if other:
                problems.append(f"{path.name} holds rows of config {other[0][:12]}, not of this run's config "
                                f"{manifest['config_digest'][:12]}; re-run the same command to rewrite it.")
        if path.name == "steps.parquet" and "checkpoint" in df.columns:
            missing = sorted(d for d in set(map(str, df["checkpoint"].dropna()))
                             if not (run_dir / "checkpoints" / f"{d}.pt").is_file())
            if missing:
                problems.append(f"{len(missing)} checkpoint(s) named in steps.parquet are missing from checkpoints/ "
                                f"(first: {missing[0][:12]}); re-run the same command to recompute them.")
    return problems


def checkpoint_problem(path: Path) -> str | None:
    """Why `checkpoints/<digest>.pt` does not hold what its name says (None when it does). The name is the
    sha256 of the file's bytes or of the state dict's content (artifacts.checkpoints.state_digest)."""
    rel = f"checkpoints/{path.name}"
    if not _HEX64.match(path.stem):
        return f"{rel} is not named by a sha256 digest; delete it (it was not written by rumflow)."
    if path.stat().st_size == 0:
        return f"{rel} is empty (0 bytes); delete it and re-run the same command to recompute it."
    if _sha256(path) == path.stem:
        return None
    import torch

    from rumflow.artifacts.checkpoints import state_digest

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        digest = state_digest(state)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        return (f"{rel} is not a readable checkpoint ({type(exc).__name__}); delete it and re-run the same "
                "command to recompute it.")
    if digest != path.stem:
        return (f"{rel} does not match its name (its content digest is {digest[:12]}); delete it and re-run the "
                "same command to recompute it.")
    return None


def scores_problem(path: Path) -> str | None:
    """Why `scores/<name>-<digest16>.parquet` does not hold what its name says (None when it does)."""
    rel = f"scores/{path.name}"
    match = _SCORES.match(path.stem)
    if not match:
        return f"{rel} is not named <proxy>-<digest>.parquet; delete it (it was not written by rumflow)."
    problem, df = _parquet_problem(path)
    if problem:
        return problem
    digest = scores_digest(df)
    if digest != match["digest"]:
        return (f"{rel} does not match the digest in its name (its content digest is {digest}); delete it and "
                "re-run the same command to recompute it.")
    return None


def verify(run_dir: Path) -> list[str]:
    """Every problem of the run folder, one line each; empty when it is intact (see the module docstring)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return [f"{run_dir} is not a folder; give the folder of a run (<out>/<name>/)."]
    problems, manifest = _check_manifest(run_dir)
    if manifest is not None:
        problems += _unlisted(run_dir, manifest)
    problems += _check_tables(run_dir, manifest)
    problems += [p for p in map(checkpoint_problem, sorted((run_dir / "checkpoints").glob("*.pt"))) if p]
    problems += [p for p in map(scores_problem, sorted((run_dir / "scores").glob("*.parquet"))) if p]
    holder = read_lock(run_dir)
    if holder is None or not holder_alive(holder) or _is_ours(holder):
        problems += [f"{t.relative_to(run_dir).as_posix()} is a temporary file left by an interrupted write; "
                     "delete it." for t in sorted(run_dir.rglob(f".*{TEMP_SUFFIX}")) if t.is_file()]
    for check in _CHECKS:
        problems += check(run_dir)
    return problems
