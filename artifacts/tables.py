"""Parquet and text outputs, each written whole or not at all, and read back with one-sentence errors.

Every write goes to a temporary name beside the target (`.<name>.<random>.tmp`), is flushed to disk and
then `os.replace`d over the target, so a reader sees the old file or the new one, never half of one. A
write that fails (disk full, read-only, no permission) removes its temporary file and raises one sentence
(`DiskFullError` / `OutputError`) instead of a traceback.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from pathlib import Path

import pandas as pd

from rumflow.errors import DataError, DiskFullError, OutputError, RumflowError

TEMP_SUFFIX = ".tmp"
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_error(exc: OSError, path: str | Path | None = None) -> RumflowError | None:
    """The one-sentence error for an OSError met while writing `path` (None: not a write problem we name)."""
    named = path if path is not None else exc.filename
    if named is None:
        if exc.errno in _FULL:
            return DiskFullError("the disk holding the run folder is full (a write failed with "
                                 f"{errno.errorcode.get(exc.errno, exc.errno)}); free space and run again; "
                                 "files are replaced whole, so nothing was half-written.")
        return None
    target = Path(named)
    if exc.errno in _FULL:
        return DiskFullError(f"the disk holding {target.parent} is full (while writing {target.name}); "
                             "free space and run again; nothing was half-written.")
    if exc.errno == errno.EROFS:
        return OutputError(f"cannot write {target}: its file system is read-only; choose a writable --out "
                           "folder.")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {target}: permission denied; fix the folder's permissions or "
                           "choose another --out folder.")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(exc, (NotADirectoryError, FileExistsError)):
        return OutputError(f"cannot write {target}: a file stands where a folder is needed "
                           f"({exc.filename or target.parent}); move it away or choose another --out folder.")
    return None


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all; write failures become one sentence, and no temporary
    file is left behind."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _sync_folder(path.parent)
    except OSError as exc:
        _remove(tmp)
        mapped = write_error(exc, path)
        if mapped is None:
            raise
        raise mapped from exc
    except BaseException:
        _remove(tmp)
        raise
    return path


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for a moment, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _sync_folder(folder: Path) -> None:
    """Flush the rename itself (best effort: not every file system lets a folder be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Write `df` as Parquet atomically (temporary file, then rename)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return atomic_write_bytes(Path(path), buf.getvalue())


def write_text(text: str, path: str | Path) -> Path:
    """Write a text file atomically."""
    return atomic_write_bytes(Path(path), text.encode())


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a Parquet file; a missing, empty, truncated or scrambled file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is missing; re-run the same command to write it.")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes), so it was cut off while being written; re-run the "
                        "same command to rewrite it, or restore it from a copy.")
    try:
        return pd.read_parquet(path, columns=columns)
    except Exception as exc:  # pyarrow raises several types for damaged files; all mean the same to a user
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path} is not a readable Parquet file ({reason}); it is truncated or corrupted: "
                        "re-run the same command to rewrite it, or restore it from a copy.") from None
