"""The service's transactional store: requests, model versions, steps, the ledger, audits and the lease.

Two databases behind one API. By default SQLite in the service folder (stdlib sqlite3, WAL journal,
synchronous=FULL); for a shared deployment PostgreSQL behind a URL (`store.url: postgresql://...`,
psycopg 3, the `postgres` extra). Every change is one transaction that takes the store's writer lock
first (`BEGIN IMMEDIATE` in SQLite, `LOCK TABLE meta IN EXCLUSIVE MODE` in PostgreSQL), so write
transactions run one after another on either database: a request is durable when `add_request`
returns, the lease has one holder, and a step's ledger rows, its requests' new states and the promotion
of its version commit together or not at all.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from rumflow.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'rejected', 'failed')),
    n_examples INTEGER NOT NULL, note TEXT, received_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    step INTEGER, reason TEXT);
CREATE TABLE IF NOT EXISTS request_examples (
    request_id TEXT NOT NULL REFERENCES requests (request_id), example_id INTEGER NOT NULL,
    PRIMARY KEY (request_id, example_id));
CREATE INDEX IF NOT EXISTS request_examples_by_id ON request_examples (example_id);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, parent INTEGER REFERENCES versions (version),
    step INTEGER, promoted INTEGER NOT NULL, created_at TEXT NOT NULL, origin TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY, state TEXT NOT NULL CHECK (state IN ('running', 'done')),
    parent INTEGER NOT NULL REFERENCES versions (version), request_ids TEXT NOT NULL,
    started_at TEXT NOT NULL, finished_at TEXT, flow_run_id TEXT, attempts INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS ledger (
    request_id TEXT PRIMARY KEY REFERENCES requests (request_id), step INTEGER NOT NULL REFERENCES steps (step),
    step_requests TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, received_at TEXT NOT NULL,
    completed_at TEXT NOT NULL, n_examples INTEGER NOT NULL, n_step_examples INTEGER NOT NULL,
    tier_low INTEGER, tier_mid INTEGER, tier_high INTEGER, parent_version INTEGER NOT NULL,
    parent_sha256 TEXT NOT NULL, version INTEGER, sha256 TEXT, promoted INTEGER NOT NULL, proxy TEXT,
    methods TEXT, figures TEXT, gates TEXT, gates_passed INTEGER, seconds REAL, seconds_proxy REAL,
    seconds_unlearn REAL, seconds_evaluate REAL, flow_run_id TEXT, config_sha TEXT, rumflow_version TEXT,
    torch_version TEXT, device TEXT, host TEXT);
CREATE TABLE IF NOT EXISTS audits (
    audit INTEGER PRIMARY KEY AUTOINCREMENT, version INTEGER NOT NULL REFERENCES versions (version),
    sha256 TEXT NOT NULL, reference_sha256 TEXT NOT NULL, n_forgotten INTEGER NOT NULL, figures TEXT NOT NULL,
    tow REAL, tow_mia REAL, seconds_retrain REAL, completed_at TEXT NOT NULL, flow_run_id TEXT);
CREATE TABLE IF NOT EXISTS lease (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    pid_start TEXT, acquired REAL NOT NULL, heartbeat REAL NOT NULL);
"""

LEDGER_FILE = "ledger.sqlite"
JSON_COLUMNS = ("step_requests", "methods", "figures", "gates")


def now() -> str:
    """The current UTC time as ISO 8601 (seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pid_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of process `pid`, None when it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` still runs and is the same process (not a reused pid)."""
    now_start = _pid_start(pid)
    return now_start is not None and (start is None or now_start == start)


def fsync_dir(path: Path) -> None:
    """Make the directory entries under `path` durable (after an atomic rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Step:
    """A step in progress: its number, the parent version, the requests and their examples."""

    step: int
    parent: int
    parent_sha256: str
    request_ids: list[str]
    example_ids: list[int]      # the union of the requests' ids, sorted
    before: list[int]           # every id forgotten by earlier steps, sorted
    received: dict[str, str]    # request id -> received time
    counts: dict[str, int]      # request id -> number of ids
    resumed: bool
    target: int                 # the number the new version gets (stable across resumes: one writer)

    @property
    def label(self) -> str:
        return f"v{self.target}"


POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_url(target: str | Path) -> bool:
    """Whether a store target is a database URL (else it is the path of a SQLite file)."""
    return isinstance(target, str) and "://" in target


def store_target(url: str | None, root: str | Path) -> str | Path:
    """The store of a service: its database URL, or the SQLite file in its folder when `url` is null."""
    return url if url else Path(root) / LEDGER_FILE


def masked(url: str) -> str:
    """`url` with its password replaced by ***, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class Row(tuple):
    """A PostgreSQL result row readable by position and by column name, like sqlite3.Row."""

    names: tuple[str, ...]

    def __new__(cls, names: tuple[str, ...], values: Iterable[Any]) -> "Row":
        row = super().__new__(cls, values)
        row.names = names
        return row

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self.names.index(key) if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self.names)


def _row_factory(cursor: Any) -> Any:
    names = tuple(d.name for d in cursor.description or ())
    return lambda values: Row(names, values)


class Store:
    """One connection to the service's database and the few things its dialect spells differently:
    placeholders (`?` here, `%s` in psycopg), the writer lock, column types and row objects."""

    def __init__(self, target: str | Path):
        self.target = target
        self.dialect = "postgresql" if is_url(target) else "sqlite"
        postgres = self.dialect == "postgresql"
        self.conn = self._pg_connect(str(target)) if postgres else self._sqlite_connect(Path(target))

    @staticmethod
    def _sqlite_connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a request is on disk when the command returns
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=60000")
        return conn

    @staticmethod
    def _pg_connect(url: str) -> Any:
        try:
            import psycopg
        except ImportError:
            raise ConfigError("store.url names a PostgreSQL database, which needs psycopg: install it with "
                              "`pip install -e \".[postgres]\"`.") from None
        try:
            port = psycopg.conninfo.conninfo_to_dict(url).get("port")
            if port is not None and not all(p.isdigit() and 0 < int(p) < 65536 for p in str(port).split(",")):
                raise psycopg.ProgrammingError(f"port '{port}' is not a TCP port number")
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"store.url '{masked(url)}' is not a valid PostgreSQL URL ({_first_line(exc)}); "
                              "write it as postgresql://user@host:port/database.") from None
        try:
            # autocommit: a read is its own statement; a write is an explicit BEGIN ... COMMIT (transaction())
            return psycopg.connect(url, autocommit=True, row_factory=_row_factory, connect_timeout=30)
        except psycopg.Error as exc:
            raise ConfigError(f"cannot connect to the service store at {masked(url)} ({_first_line(exc)}); check "
                              "store.url and that the database server is running.") from None

    def sql(self, text: str) -> str:
        """A statement written with `?` placeholders, in this dialect."""
        return text if self.dialect == "sqlite" else text.replace("%", "%%").replace("?", "%s")

    def execute(self, text: str, params: Iterable[Any] = ()) -> Any:
        return self.conn.execute(self.sql(text), tuple(params))

    def executemany(self, text: str, rows: Iterable[Iterable[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if not rows:
            return
        if self.dialect == "sqlite":
            self.conn.executemany(text, rows)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(self.sql(text), rows)

    def begin(self) -> None:
        """Start a write transaction holding the store's writer lock until COMMIT or ROLLBACK."""
        if self.dialect == "sqlite":
            self.conn.execute("BEGIN IMMEDIATE")
        else:  # EXCLUSIVE conflicts with itself (one writer at a time) but not with plain reads
            self.conn.execute("BEGIN")
            self.conn.execute("LOCK TABLE meta IN EXCLUSIVE MODE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except Exception:  # a broken connection: the server rolls the transaction back itself
            pass

    def schema(self) -> list[str]:
        """The CREATE statements of the tables, in this dialect."""
        text = SCHEMA
        if self.dialect == "postgresql":  # REAL is 4 bytes there: a heartbeat's time.time() needs 8
            text = text.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "INTEGER GENERATED BY DEFAULT AS IDENTITY "
                                "PRIMARY KEY").replace(" REAL", " DOUBLE PRECISION")
        return [s.strip() for s in text.split(";") if s.strip()]

    def has_tables(self) -> bool:
        """Whether the service's tables exist here (a SQLite file or the PostgreSQL search path)."""
        if self.dialect == "sqlite":
            query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        else:
            query = "SELECT 1 WHERE to_regclass('meta') IS NOT NULL"
        return self.execute(query).fetchone() is not None

    def describe(self) -> str:
        return f"'{self.target}'" if self.dialect == "sqlite" else masked(str(self.target))

    def close(self) -> None:
        self.conn.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


class Ledger:
    """One service's store; every public method is one transaction."""

    def __init__(self, target: str | Path):
        """Open the ledger at `target`: a SQLite file's path or a PostgreSQL URL."""
        self.target = target if is_url(target) else Path(target)
        if not is_url(target) and not self.target.is_file():
            raise ConfigError(f"'{self.target.parent}' holds no service ledger; create the service first with "
                              "`rumflow service create --config service.yaml`.")
        self._conn = Store(self.target)
        if is_url(target) and not self._conn.has_tables():
            self._conn.close()
            raise ConfigError(f"the database at {masked(target)} holds no service ledger; create the service "
                              "first with `rumflow service create --config service.yaml`.")

    @property
    def dialect(self) -> str:
        return self._conn.dialect

    @staticmethod
    def exists(target: str | Path) -> bool:
        """Whether a service ledger is at `target` already."""
        if not is_url(target):
            return Path(target).exists()
        store = Store(target)
        try:
            return store.has_tables()
        finally:
            store.close()

    @classmethod
    def create(cls, target: str | Path, name: str, config_sha: str) -> "Ledger":
        """Create the tables of a new service (refuses an existing ledger)."""
        if not is_url(target):
            target = Path(target)
            if target.exists():
                raise ConfigError(f"'{target.parent}' already holds a service; choose another --dir or remove it.")
            target.parent.mkdir(parents=True, exist_ok=True)
        store = Store(target)
        try:
            if store.dialect == "sqlite":
                store.conn.executescript(";\n".join(store.schema()) + ";")
                store.begin()
            else:  # DDL is transactional in PostgreSQL: the tables appear together, with their meta rows
                store.execute("BEGIN")
                if store.has_tables():
                    store.rollback()
                    raise ConfigError(f"the database at {masked(target)} already holds a service; give each "
                                      "service its own database (or schema), or drop its tables.")
                for statement in store.schema():
                    store.execute(statement)
                store.execute("LOCK TABLE meta IN EXCLUSIVE MODE")
            store.executemany("INSERT INTO meta VALUES (?, ?)", [("name", name), ("config_sha", config_sha),
                                                                 ("created_at", now()), ("schema", "1")])
            store.commit()
        finally:
            store.close()
        return cls(target)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """BEGIN (taking the writer lock up front) ... COMMIT, ROLLBACK on any error."""
        conn = self._conn
        conn.begin()
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row["value"]

    # -- versions -----------------------------------------------------------------------------------

    def set_version0(self, sha256: str, origin: str) -> None:
        """Record version 0 and make it current (once)."""
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM versions WHERE version = 0").fetchone():
                return
            c.execute("INSERT INTO versions VALUES (0, ?, NULL, NULL, 1, ?, ?)", (sha256, now(), origin))
            c.execute("INSERT INTO meta VALUES ('current_version', '0') ON CONFLICT (key) DO UPDATE SET value = "
                      "excluded.value")

    def current(self) -> tuple[int, str]:
        """(version, sha256) of the production model."""
        v = self.meta("current_version")
        if v is None:
            raise ConfigError("the service has no version 0 yet; run `rumflow service create` again to finish it.")
        row = self._conn.execute("SELECT sha256 FROM versions WHERE version = ?", (int(v),)).fetchone()
        return int(v), row["sha256"]

    def version(self, n: int) -> dict[str, Any]:
        """The version row `n`, or a ConfigError listing what exists."""
        row = self._conn.execute("SELECT * FROM versions WHERE version = ?", (n,)).fetchone()
        if row is None:
            last = self._conn.execute("SELECT MAX(version) FROM versions").fetchone()[0]
            raise ConfigError(f"the service has no version {n}; versions run from 0 to {last}.")
        return dict(row)

    def versions(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn.execute("SELECT * FROM versions ORDER BY version")]

    # -- requests -----------------------------------------------------------------------------------

    def _owners(self, c: Store, states: tuple[str, ...]) -> dict[int, str]:
        marks = ",".join("?" * len(states))
        rows = c.execute(f"SELECT e.example_id, e.request_id FROM request_examples e JOIN requests r "
                         f"USING (request_id) WHERE r.state IN ({marks})", states)
        return {int(r[0]): r[1] for r in rows}

    def forgotten(self) -> list[int]:
        """Every example id forgotten by a done request, sorted."""
        return sorted(self._owners(self._conn, ("done",)))

    def add_request(self, ids: list[int], train_ids: np.ndarray, request_id: str | None = None,
                    note: str | None = None) -> dict[str, Any]:
        """Validate and queue a request in one transaction; ConfigError (nothing stored) on refusal."""
        from rumflow.service import check_request_id, validate_request

        with self.transaction() as c:
            existing = {r[0] for r in c.execute("SELECT request_id FROM requests")}
            seq = int(c.execute("SELECT COALESCE(MAX(seq), 0) FROM requests").fetchone()[0]) + 1
            if request_id is None:
                n = seq
                while f"r{n}" in existing:
                    n += 1
                request_id = f"r{n}"
            check_request_id(request_id, existing)
            accepted = validate_request(ids, train_ids, self._owners(c, ("done",)),
                                        self._owners(c, ("queued", "running")))
            stamp = now()
            c.execute("INSERT INTO requests VALUES (?, ?, 'queued', ?, ?, ?, ?, NULL, NULL)",
                      (request_id, seq, len(accepted), note, stamp, stamp))
            c.executemany("INSERT INTO request_examples VALUES (?, ?)", [(request_id, i) for i in accepted])
        return self.request(request_id)

    def request(self, request_id: str) -> dict[str, Any]:
        row = self._conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            raise ConfigError(f"there is no request '{request_id}'; `rumflow request list` shows them.")
        return dict(row)

    def requests(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn.execute("SELECT * FROM requests ORDER BY seq")]

    def request_ids(self, request_id: str) -> list[int]:
        rows = self._conn.execute("SELECT example_id FROM request_examples WHERE request_id = ? "
                                  "ORDER BY example_id", (request_id,))
        return [int(r[0]) for r in rows]

    def reject(self, request_id: str, reason: str) -> None:
        """Withdraw a queued request (state rejected, with the reason)."""
        with self.transaction() as c:
            row = c.execute("SELECT state FROM requests WHERE request_id = ?", (request_id,)).fetchone()
            if row is None:
                raise ConfigError(f"there is no request '{request_id}'; `rumflow request list` shows them.")
            if row["state"] != "queued":
                raise ConfigError(f"request '{request_id}' is {row['state']}, not queued; only a queued request "
                                  "can be withdrawn.")
            c.execute("UPDATE requests SET state = 'rejected', reason = ?, updated_at = ? WHERE request_id = ?",
                      (reason, now(), request_id))

    # -- steps --------------------------------------------------------------------------------------

    def open_step(self, batch: str, flow_run_id: str | None) -> Step | None:
        """The unfinished step (after a crash: the same requests on the same parent), else a new step
        over the queued requests (all, or the oldest one), else None. Call it holding the lease."""
        with self.transaction() as c:
            row = c.execute("SELECT * FROM steps WHERE state = 'running' ORDER BY step LIMIT 1").fetchone()
            resumed = row is not None
            if resumed:
                c.execute("UPDATE steps SET attempts = attempts + 1, flow_run_id = ? WHERE step = ?",
                          (flow_run_id, row["step"]))
                step_no, parent, request_ids = row["step"], row["parent"], json.loads(row["request_ids"])
            else:
                queued = [r[0] for r in c.execute("SELECT request_id FROM requests WHERE state = 'queued' "
                                                  "ORDER BY seq")]
                if not queued:
                    return None
                request_ids = queued[:1] if batch == "one" else queued
                step_no = int(c.execute("SELECT COALESCE(MAX(step), 0) FROM steps").fetchone()[0]) + 1
                parent = int(c.execute("SELECT value FROM meta WHERE key = 'current_version'").fetchone()[0])
                c.execute("INSERT INTO steps VALUES (?, 'running', ?, ?, ?, NULL, ?, 1)",
                          (step_no, parent, json.dumps(request_ids), now(), flow_run_id))
                marks = ",".join("?" * len(request_ids))
                c.execute(f"UPDATE requests SET state = 'running', step = ?, updated_at = ? "
                          f"WHERE request_id IN ({marks})", (step_no, now(), *request_ids))
            sha = c.execute("SELECT sha256 FROM versions WHERE version = ?", (parent,)).fetchone()[0]
            marks = ",".join("?" * len(request_ids))
            info = {r["request_id"]: r for r in c.execute(f"SELECT * FROM requests WHERE request_id IN ({marks})",
                                                          request_ids)}
            ids = sorted(int(r[0]) for r in c.execute(
                f"SELECT example_id FROM request_examples WHERE request_id IN ({marks})", request_ids))
            before = sorted(self._owners(c, ("done",)))
            target = int(c.execute("SELECT MAX(version) FROM versions").fetchone()[0]) + 1
        return Step(step_no, parent, sha, request_ids, ids, before,
                    {k: info[k]["received_at"] for k in request_ids},
                    {k: info[k]["n_examples"] for k in request_ids}, resumed, target)

    def commit_step(self, step: Step, sha256: str | None, promote: bool, reason: str | None,
                    row: dict[str, Any], holder: str) -> int | None:
        """Close `step` in one transaction: the new version (if any), its promotion when it passed,
        one ledger row per request, and the requests' final states. Returns the new version number.
        Refuses unless `holder` still holds the lease and the step is still open."""
        with self.transaction() as c:
            lease = c.execute("SELECT holder FROM lease WHERE name = 'service'").fetchone()
            if lease is None or lease[0] != holder:
                raise RuntimeError(f"step {step.step}: this run lost the service lease; nothing was committed")
            state = c.execute("SELECT state FROM steps WHERE step = ?", (step.step,)).fetchone()
            if state is None or state[0] != "running":
                raise RuntimeError(f"step {step.step} is not running any more; it was closed by another run")
            stamp, version = now(), None
            if sha256 is not None:
                version = step.target
                c.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, 'unlearned')",
                          (version, sha256, step.parent, step.step, int(promote), stamp))
                if promote:
                    c.execute("UPDATE meta SET value = ? WHERE key = 'current_version'", (str(version),))
            final = "done" if promote else "failed"
            for rid in step.request_ids:
                values = {**row, "request_id": rid, "step": step.step, "step_requests": step.request_ids,
                          "state": final, "reason": reason, "received_at": step.received[rid], "completed_at": stamp,
                          "n_examples": step.counts[rid], "n_step_examples": len(step.example_ids),
                          "parent_version": step.parent, "parent_sha256": step.parent_sha256, "version": version,
                          "sha256": sha256, "promoted": int(promote)}
                values = {k: json.dumps(v, sort_keys=True) if k in JSON_COLUMNS else v for k, v in values.items()}
                cols = ", ".join(values)
                c.execute(f"INSERT INTO ledger ({cols}) VALUES ({', '.join('?' * len(values))})",
                          tuple(values.values()))
                c.execute("UPDATE requests SET state = ?, reason = ?, updated_at = ? WHERE request_id = ?",
                          (final, reason, stamp, rid))
            c.execute("UPDATE steps SET state = 'done', finished_at = ? WHERE step = ?", (stamp, step.step))
        return version

    def rows(self) -> list[dict[str, Any]]:
        """Every ledger row (JSON columns decoded), in step then request order."""
        out = []
        for r in self._conn.execute("SELECT l.* FROM ledger l JOIN requests q USING (request_id) "
                                    "ORDER BY l.step, q.seq"):
            d = dict(r)
            for k in JSON_COLUMNS:
                d[k] = json.loads(d[k]) if d[k] is not None else None
            out.append(d)
        return out

    def promoted_since_audit(self) -> int:
        """Promoted versions made after the last audit's version."""
        last = self._conn.execute("SELECT COALESCE(MAX(version), 0) FROM audits").fetchone()[0]
        return int(self._conn.execute("SELECT COUNT(*) FROM versions WHERE promoted = 1 AND version > ?",
                                      (last,)).fetchone()[0])

    # -- audits -------------------------------------------------------------------------------------

    def add_audit(self, version: int, sha256: str, reference: str, n_forgotten: int, figures: dict[str, Any],
                  seconds_retrain: float, flow_run_id: str | None) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO audits (version, sha256, reference_sha256, n_forgotten, figures, tow, tow_mia, "
                      "seconds_retrain, completed_at, flow_run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (version, sha256, reference, n_forgotten, json.dumps(figures, sort_keys=True),
                       figures.get("tow"), figures.get("tow_mia"), seconds_retrain, now(), flow_run_id))

    def audits(self) -> list[dict[str, Any]]:
        out = []
        for r in self._conn.execute("SELECT * FROM audits ORDER BY audit"):
            d = dict(r)
            d["figures"] = json.loads(d["figures"])
            out.append(d)
        return out

    # -- the lease: at most one run works on the service ----------------------------------------------

    def try_lease(self, holder: str, timeout: float) -> dict[str, Any] | None:
        """Take the lease for `holder` (this process); None if taken, else the previous holder's row (or {})."""
        me, pid = socket.gethostname(), os.getpid()
        with self.transaction() as c:
            row = c.execute("SELECT * FROM lease WHERE name = 'service'").fetchone()
            if row is not None and row["holder"] != holder:
                dead = row["host"] == me and not _alive(row["pid"], row["pid_start"])
                stale = time.time() - row["heartbeat"] > timeout
                if not (dead or stale):
                    return None
            stamp = time.time()
            c.execute("INSERT INTO lease VALUES ('service', ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                      "holder = excluded.holder, host = excluded.host, pid = excluded.pid, pid_start = "
                      "excluded.pid_start, acquired = excluded.acquired, heartbeat = excluded.heartbeat",
                      (holder, me, pid, _pid_start(pid), stamp, stamp))
        return {} if row is None else dict(row)

    def lease_holder(self) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT * FROM lease WHERE name = 'service'").fetchone()
        return None if row is None else dict(row)

    def heartbeat(self, holder: str) -> bool:
        """Renew the lease; False if another run took it (then stop working)."""
        with self.transaction() as c:
            cur = c.execute("UPDATE lease SET heartbeat = ? WHERE name = 'service' AND holder = ?",
                            (time.time(), holder))
            return cur.rowcount == 1

    def release(self, holder: str) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM lease WHERE name = 'service' AND holder = ?", (holder,))

    def holds_lease(self, holder: str) -> bool:
        row = self.lease_holder()
        return row is not None and row["holder"] == holder
