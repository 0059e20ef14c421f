"""A throwaway PostgreSQL cluster for the tests, from Debian's binaries (/usr/lib/postgresql/*/bin).

Loopback only (127.0.0.1, a free port), its unix socket and data in a temporary folder, a random
password (scram-sha-256). initdb refuses to run as root, so as root the tools run as the `postgres`
user (`runuser -u postgres --`) on a folder chowned to it. `cluster()` yields an admin URL, or None with
the reason it cannot start (no binaries, no psycopg) so that tests can skip with it.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _bin_dir() -> Path | None:
    """The newest PostgreSQL bin folder that has initdb and pg_ctl."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                   if Path(p).parent.name.isdigit() else 0)
    for path in reversed(found):
        if (Path(path) / "initdb").is_file() and (Path(path) / "pg_ctl").is_file():
            return Path(path)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable() -> str | None:
    """Why no cluster can be started here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return 'psycopg is not installed (pip install -e ".[postgres]")'
    if _bin_dir() is None:
        return "PostgreSQL's initdb is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run initdb as"
    return None


@contextmanager
def cluster() -> Iterator[str]:
    """Start a cluster; yield the admin URL of its `postgres` database; stop it and remove its folder."""
    bindir = _bin_dir()
    tmp = Path(tempfile.mkdtemp(prefix="rumflow-pg-"))
    as_pg: list[str] = []
    if os.geteuid() == 0:
        as_pg = ["runuser", "-u", "postgres", "--"]
        shutil.chown(tmp, "postgres")
    data, password = tmp / "data", secrets.token_hex(16)
    pwfile = tmp / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if as_pg:
        shutil.chown(pwfile, "postgres")
    port = _free_port()
    started = False
    try:
        subprocess.run([*as_pg, str(bindir / "initdb"), "-D", str(data), "-U", "rumflow", f"--pwfile={pwfile}",
                        "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"], check=True, capture_output=True,
                       timeout=120)
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(tmp / "postgres.log"), "-w",
                        "-t", "60", "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {tmp}", "start"],
                       check=True, capture_output=True, timeout=90)
        started = True
        yield f"postgresql://rumflow:{password}@127.0.0.1:{port}/postgres"
    except subprocess.CalledProcessError as exc:
        log = (tmp / "postgres.log").read_text() if (tmp / "postgres.log").is_file() else ""
        raise RuntimeError(f"{exc.cmd[len(as_pg)]} failed: {exc.stderr.decode()[-2000:]}{log[-2000:]}") from None
    finally:
        if started:
            subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


_SHARED: dict[str, object] = {"users": 0}


@contextmanager
def shared() -> Iterator[str]:
    """One cluster per test process, however many modules' session fixtures ask for it."""
    if not _SHARED["users"]:
        manager = cluster()
        _SHARED.update(url=manager.__enter__(), manager=manager)
    _SHARED["users"] = int(_SHARED["users"]) + 1
    try:
        yield str(_SHARED["url"])
    finally:
        _SHARED["users"] = int(_SHARED["users"]) - 1
        if not _SHARED["users"]:
            _SHARED.pop("manager").__exit__(None, None, None)  # type: ignore[union-attr]


def pg_admin_url() -> Iterator[str]:
    """Body of the tests' session fixture: the shared cluster's admin URL, or a skip saying what is missing."""
    import pytest

    reason = unavailable()
    if reason:
        pytest.skip(f"no PostgreSQL for the store tests: {reason}")
    with shared() as url:
        yield url


def fresh_schema(admin_url: str) -> str:
    """A URL whose search path is a new, empty schema: one service's own tables in the shared cluster."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    return f"{admin_url}?options=-csearch_path%3D{name}"
