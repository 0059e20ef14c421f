"""Task records that cannot execute code and cannot be silently corrupted.

Prefect persists every cached task result as a record file under `<run>/cache/`. Its default serializer
is cloudpickle, so a planted record runs arbitrary code when read, and a flipped bit loads other numbers.
Here a record's result is plain JSON (a registered pydantic type or plain data) wrapped with the sha256 of
its body; the storage block refuses, at read time, any record that names another serializer, whose body
does not match its digest, or whose files (checkpoints, scores) are missing or changed. A refused record
reads as absent, so Prefect recomputes the task and overwrites it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal, TypeVar

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem
from prefect.serializers import Serializer
from pydantic import BaseModel, Field

from rumflow.errors import RumflowError

log = logging.getLogger("rumflow.records")

SERIALIZER = "rumflow-json"
RECORD_TYPES: dict[str, type[BaseModel]] = {}
M = TypeVar("M", bound=type[BaseModel])


class CorruptRecord(RumflowError):
    """A task record that does not match its digest, or that names a forbidden serializer."""


def record_type(cls: M) -> M:
    """Allow results of pydantic type `cls` in task records (no other class is ever instantiated)."""
    RECORD_TYPES[cls.__name__] = cls
    return cls


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def encode_result(obj: Any) -> bytes:
    """A task result as checksummed JSON: a registered pydantic model, or plain JSON data."""
    if isinstance(obj, BaseException):  # a failed task's error: its type and message, as text only
        kind, data = "error", {"type": type(obj).__name__, "message": str(obj)}
    elif isinstance(obj, BaseModel):
        kind = type(obj).__name__
        if RECORD_TYPES.get(kind) is not type(obj):
            raise TypeError(f"{kind} is not a registered record type; decorate it with @record_type")
        data = obj.model_dump(mode="json")
    else:
        kind, data = "json", obj
    body = json.dumps({"kind": kind, "data": data}, allow_nan=True)  # key order kept: columns keep theirs
    return json.dumps({"sha256": _digest(body), "body": body}).encode()


def decode_result(blob: bytes) -> Any:
    """Inverse of encode_result; CorruptRecord when the body does not match its digest or type."""
    try:
        outer = json.loads(blob)
        body = outer["body"]
        ok = isinstance(body, str) and _digest(body) == outer["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"unreadable task record ({type(exc).__name__})") from None
    if not ok:
        raise CorruptRecord("task record does not match its sha256")
    inner = json.loads(body)
    kind, data = inner["kind"], inner["data"]
    if kind == "json":
        return data
    if kind == "error":
        return RumflowError(f"{data['type']}: {data['message']}")
    if kind not in RECORD_TYPES:
        raise CorruptRecord(f"task record of unknown type {kind!r}")
    return RECORD_TYPES[kind].model_validate(data)


class RecordSerializer(Serializer):
    """Prefect serializer for task results: checksummed JSON of allowed types only."""

    type: Literal["rumflow-json"] = Field(default=SERIALIZER, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return encode_result(obj)

    def loads(self, blob: bytes) -> Any:
        return decode_result(blob)


def check_record(content: bytes, run_dir: Path) -> Any:
    """The result a record file holds, after every check; CorruptRecord (or ValueError) otherwise."""
    record = json.loads(content)
    serializer = (record.get("metadata") or {}).get("serializer") or {}
    if serializer.get("type") != SERIALIZER:
        raise CorruptRecord(f"task record uses serializer {serializer.get('type')!r}, not {SERIALIZER}")
    result = record.get("result")
    if not isinstance(result, str):
        raise CorruptRecord("task record holds no JSON result")
    obj = decode_result(result.encode())
    intact = getattr(obj, "intact", None)
    if intact is not None and not intact(run_dir):
        raise CorruptRecord("a file the task record points at is missing or changed")
    return obj


class VerifiedFiles(LocalFileSystem):
    """Result storage under `<run>/cache`: a record is read only if `check_record` accepts it.

    A refused record reads as missing (Prefect then recomputes the task and writes a new record)."""

    _block_type_name = "Rumflow Verified Files"
    _block_type_slug = "rumflow-verified-files"

    async def aread_path(self, path: str) -> bytes:
        return self._read_checked(path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._read_checked(path)

    def _read_checked(self, path: str) -> bytes:
        resolved = self._resolve_path(path)
        if not resolved.is_file():
            raise ValueError(f"Path {resolved} does not exist.")
        content = resolved.read_bytes()
        self._check(path, content)
        return content

    def _check(self, path: str, content: bytes) -> None:
        run_dir = Path(self.basepath or ".").expanduser().resolve().parent
        try:
            check_record(content, run_dir)
        except Exception as exc:
            log.warning("cache record %s refused (%s); recomputing that task", path, exc)
            raise ValueError(f"refused cache record {path}: {exc}") from None
