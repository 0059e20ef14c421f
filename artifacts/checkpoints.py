"""Content-addressed checkpoint store: file name = sha256 of the weights, written atomically."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from rumflow.artifacts.tables import atomic_write_bytes  # one writer: full disks are one sentence
from rumflow.errors import CheckpointError


class CheckpointRef(BaseModel):
    """A pointer to weights in a store: tiny, JSON-hashable, and relative (the file is
    `<store>/<sha256>.pt`, so a run folder can move). `sha256` is the digest of the state dict's
    content; `file_sha256` that of the file's bytes (checked on every use without loading it)."""

    model_config = ConfigDict(frozen=True)
    sha256: str
    size: int
    file_sha256: str

    @property
    def name(self) -> str:
        return f"{self.sha256}.pt"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of a state dict, in key order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointStore:
    """A folder of `<sha256>.pt` files holding state dicts."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, ref: CheckpointRef) -> Path:
        """Where `ref`'s file lives in this store."""
        return self.root / ref.name

    def intact(self, ref: CheckpointRef) -> bool:
        """The file exists with the recorded size and byte digest (no unpickling)."""
        p = self.path(ref)
        return p.is_file() and p.stat().st_size == ref.size and file_digest(p) == ref.file_sha256

    def save(self, model_or_state: torch.nn.Module | dict[str, torch.Tensor]) -> CheckpointRef:
        """Store the weights (finite ones only) and return their reference."""
        state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
        state = {k: v.detach().cpu().clone() for k, v in state.items()}
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"refusing to save weights with non-finite values in {bad[0]}; "
                                  "the run that produced them diverged.")
        digest = state_digest(state)
        path = self.root / f"{digest}.pt"
        if not (path.is_file() and self._digest_of(path) == digest):
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(path, buf.getvalue())
        return CheckpointRef(sha256=digest, size=path.stat().st_size, file_sha256=file_digest(path))

    @staticmethod
    def _digest_of(path: Path) -> str | None:
        try:
            return state_digest(torch.load(path, map_location="cpu", weights_only=True))
        except Exception:
            return None

    def load_state(self, ref: CheckpointRef) -> dict[str, torch.Tensor]:
        """Load a state dict after checking that its content matches the digest."""
        path = self.path(ref)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} is missing; re-run the same command to recompute it.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); "
                                  "delete it and re-run the same command to recompute it.") from exc
        if state_digest(state) != ref.sha256:
            raise CheckpointError(f"checkpoint {path} does not match its sha256 {ref.sha256[:12]}; "
                                  "delete it and re-run the same command to recompute it.")
        return state

    def load_into(self, ref: CheckpointRef, model: torch.nn.Module) -> torch.nn.Module:
        """Load verified weights into `model` and return it."""
        model.load_state_dict(self.load_state(ref))
        return model
