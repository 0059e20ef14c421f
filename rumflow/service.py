"""The erasure-request service: its configuration, request parsing and validation, and the quality gates.

Pure logic only (no Prefect, no database): the ledger (rumflow.artifacts.ledger) stores what these
functions decide, and the service flow (rumflow.flows.service) runs the work.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from rumflow.config import (DataConfig, HoldoutConfig, ModelConfig, RumConfig, Strict, TrainConfig, explain)
from rumflow.errors import ConfigError

REQUEST_STATES = ("queued", "running", "done", "rejected", "failed")
REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SERVICE_FILE = "service.yaml"
TRAIN_IDS = "train_ids.npy"  # the training ids, saved at creation: requests are validated without the data


class Version0Config(Strict):
    source: Literal["train", "experiment"] = Field(
        "train", description="train: the service trains version 0 itself (a cached task); experiment: take "
        "the original model of a finished `rumflow run`")
    run: str | None = Field(None, description="the experiment's run folder (<out>/<name>/) when source is "
                            "experiment")
    seed: int = Field(0, description="which seed's original model to take from the experiment")

    @model_validator(mode="after")
    def _run_given(self) -> "Version0Config":
        if self.source == "experiment" and not self.run:
            raise ValueError("version0.source is experiment but version0.run is not set; give the run folder "
                             "of a finished `rumflow run` (e.g. runs/digits-demo)")
        return self


class GateConfig(Strict):
    """What a new version must satisfy to be promoted (null turns a gate off)."""

    forget_alpha: float | None = Field(
        0.05, gt=0, lt=1, description="two-sided binomial test: fail when accuracy on the forgotten examples "
        "differs from held-out (test) accuracy, above it (forgets too little) or below it (forgets too much, "
        "itself a membership signal), by more than chance explains at this significance level")
    max_forget_gap: float | None = Field(
        None, ge=0, le=1, description="tolerance band: fail when accuracy on the forgotten examples is more than "
        "this above or below held-out (test) accuracy")
    min_mia: float | None = Field(
        None, ge=0, le=1, description="fail when MIA efficacy on the forgotten examples (fraction judged "
        "non-members) is below this")
    max_retain_drop: float | None = Field(
        0.05, ge=0, le=1, description="fail when retain accuracy falls by more than this from the previous version")
    max_test_drop: float | None = Field(
        0.05, ge=0, le=1, description="fail when test accuracy falls by more than this from the previous version")


class AuditConfig(Strict):
    every: int = Field(0, ge=0, description="train a retrain reference and record ToW / ToW-MIA of the current "
                       "version every N promoted versions (0 = only on `rumflow audit`)")


class EvaluateSettings(Strict):
    mia: bool = Field(True, description="run the SVC membership-inference attack on the forgotten examples")
    mia_max_shadow: int = Field(10000, ge=10, description="at most this many retain examples as shadow members")


class LeaseConfig(Strict):
    timeout: float = Field(300.0, gt=0, description="seconds without a heartbeat after which another host's "
                           "lease counts as stale (a dead process on this host is noticed at once)")
    wait: float = Field(60.0, ge=0, description="seconds a run waits for the lease held by another run before "
                        "it finishes without work")


class StoreConfig(Strict):
    url: str | None = Field(None, description="null: SQLite (ledger.sqlite) in the service folder; or a "
                            "PostgreSQL URL, postgresql://user@host:port/database, for a shared deployment "
                            "(needs the postgres extra; libpq's PGPASSWORD or ~/.pgpass keep the password out "
                            "of the config)")

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, v: str | None) -> str | None:
        if v is not None and v.split("://", 1)[0] not in ("postgresql", "postgres"):
            raise ValueError(f"'{v}' is not a PostgreSQL URL; write postgresql://user@host:port/database, or "
                             "null for SQLite in the service folder")
        return v


SERVICE_PROXIES = ("holdout_retraining", "confidence", "max_confidence", "entropy", "binary_accuracy")


class ServiceConfig(Strict):
    name: str = Field("digits-service", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="service name: the deployment and the artifact keys carry it")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig, description="recipe of version 0 and of audit retrains")
    seed: int = Field(0, description="seed of version 0, of every unlearning call (offset per step and tier) "
                      "and of the audit retrains")
    version0: Version0Config = Field(default_factory=Version0Config)
    proxy: str = Field("holdout_retraining", description="proxy that tiers each request: holdout_retraining is "
                       "scored on the current production model at every step; a learning-event proxy "
                       "(confidence, ...) is taken once from version 0's training")
    holdout: HoldoutConfig = Field(default_factory=HoldoutConfig)
    tier_cuts: tuple[float, float] = Field((1 / 3, 2 / 3), description="pool quantiles of the proxy that "
                                           "separate low | mid | high")
    rum: RumConfig = Field(default_factory=RumConfig)
    batch: Literal["all", "one"] = Field("all", description="a step takes every queued request (all) or the "
                                         "oldest one (one)")
    gates: GateConfig = Field(default_factory=GateConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    store: StoreConfig = Field(default_factory=StoreConfig, description="where the requests and the ledger live")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")

    @field_validator("proxy")
    @classmethod
    def _service_proxy(cls, v: str) -> str:
        if v not in SERVICE_PROXIES:
            raise ValueError(f"proxy '{v}' cannot tier service requests; choose one of: {', '.join(SERVICE_PROXIES)}")
        return v

    @field_validator("tier_cuts")
    @classmethod
    def _cuts(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError("tier_cuts must be two quantiles with 0 <= first <= second <= 1")
        return v

    @model_validator(mode="after")
    def _events_need_training(self) -> "ServiceConfig":
        if self.proxy != "holdout_retraining" and self.version0.source != "train":
            raise ValueError(f"proxy '{self.proxy}' is recorded while version 0 trains, so it needs "
                             "version0.source: train; use proxy holdout_retraining with an experiment's model")
        return self

    @model_validator(mode="after")
    def _mia_gate_needs_mia(self) -> "ServiceConfig":
        if self.gates.min_mia is not None and not self.evaluate.mia:
            raise ValueError("gates.min_mia needs the attack: set evaluate.mia: true or gates.min_mia: null")
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON of everything that decides the numbers (not the name, lease or store)."""
        body = self.model_dump(mode="json", exclude={"name", "lease", "store"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def load_service_config(path: str | Path) -> ServiceConfig:
    """Read and validate a service config (YAML/JSON); ConfigError with one sentence on problems."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"service config '{p}' does not exist; check the path given to --config.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"service config '{p}' is not valid YAML/JSON ({exc.__class__.__name__}); "
                          "fix its syntax.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"service config '{p}' must hold a mapping of keys to values at the top level.")
    return validate_service_config(data)


def validate_service_config(data: dict[str, Any]) -> ServiceConfig:
    """Validate a mapping into a ServiceConfig; ConfigError with one sentence on failure."""
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(explain(exc).replace("fix it in the config or with --set", "fix it in the config")) from None


def dump_service_config(cfg: ServiceConfig) -> str:
    """The resolved service config as YAML (every default spelled out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Requests: parsing and validation (one sentence per refusal; nothing is stored on refusal)


def _as_id(token: str, where: str, hint: str) -> int:
    """One integer example id from `token`, or a ConfigError naming where it came from."""
    text = token.strip()
    if not re.fullmatch(r"[+]?\d+", text):
        raise ConfigError(f"{where}: '{text}' is not an integer example id; {hint}.")
    return int(text)


def parse_id_list(text: str) -> list[int]:
    """Ids from `--ids 12,907,3311` (commas or spaces)."""
    tokens = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    return [_as_id(t, "--ids", "separate ids with commas, e.g. --ids 12,907,3311") for t in tokens]


def parse_id_file(path: str | Path) -> list[int]:
    """Ids from a file with one id a line (blank lines and `#` comments are skipped)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ids file '{p}' does not exist; check the path given to --file.")
    try:
        lines = p.read_text().splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"ids file '{p}' is not a text file; write one integer id a line.") from None
    ids = []
    for number, line in enumerate(lines, start=1):
        body = line.split("#", 1)[0].strip()
        if body:
            ids.append(_as_id(body, f"ids file '{p}' line {number}", "write one integer id a line"))
    return ids


def _some(n: int, singular: str, plural: str) -> str:
    """'id 5 is ...' style agreement: '1 of the ids is' / '3 of the ids are'."""
    return f"{n} of the ids {singular if n == 1 else plural}"


def _listing(ids: Iterable[int], limit: int = 5) -> str:
    ids = sorted(ids)
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def check_request_id(request_id: str, existing: set[str]) -> None:
    """The request id is well formed and not taken."""
    if not REQUEST_ID.match(request_id):
        raise ConfigError(f"request id '{request_id}' is not valid; use letters, digits, '.', '_' or '-' "
                          "(at most 64), starting with a letter or digit.")
    if request_id in existing:
        raise ConfigError(f"a request with id '{request_id}' already exists; choose another --id or leave it out.")


def validate_request(ids: list[int], train_ids: np.ndarray, forgotten: dict[int, str], pending: dict[int, str],
                     min_retain: int = 2) -> list[int]:
    """The sorted ids of an acceptable request, or a ConfigError saying why it is refused.

    `forgotten` and `pending` map example ids to the request that forgot them or holds them (queued or
    running). A retain set of at least `min_retain` examples must remain after every pending request."""
    if not ids:
        raise ConfigError("the request names no example ids; give at least one with --ids or --file.")
    arr = np.asarray(ids, dtype=np.int64)
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ConfigError(f"the request lists id {_listing(uniq[counts > 1])} more than once; list each id once.")
    unknown = uniq[~np.isin(uniq, np.asarray(train_ids, dtype=np.int64))]
    if len(unknown):
        raise ConfigError(f"{_some(len(unknown), 'is', 'are')} not in the training set ({_listing(unknown)}); only "
                          "training examples can be forgotten: remove them from the request.")
    done = [int(i) for i in uniq if int(i) in forgotten]
    if done:
        raise ConfigError(f"{_some(len(done), 'was', 'were')} already forgotten ({_listing(done)}, by request "
                          f"'{forgotten[done[0]]}'); remove them from the request.")
    queued = [int(i) for i in uniq if int(i) in pending]
    if queued:
        raise ConfigError(f"{_some(len(queued), 'is', 'are')} already queued ({_listing(queued)}, in request "
                          f"'{pending[queued[0]]}'); remove them from the request.")
    left = len(train_ids) - len(forgotten) - len(pending) - len(uniq)
    if left < min_retain:
        raise ConfigError(f"the request would leave {left} training examples to retain; a model needs at least "
                          f"{min_retain}: send fewer ids.")
    return uniq.tolist()


# ---------------------------------------------------------------------------------------------
# Gates: measured figures of a new version against its parent


def forget_p_value(correct: int, n: int, heldout_accuracy: float) -> float:
    """Two-sided binomial test of `correct` out of `n` against X ~ Binomial(n, heldout_accuracy): the
    probability of an outcome at most as likely as this one if the forgotten examples were unseen ones
    (scipy's binomtest; 1.0 for an empty set). Small when they score far above or far below held-out."""
    if n == 0 or not math.isfinite(heldout_accuracy):
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(int(correct), int(n), min(max(heldout_accuracy, 0.0), 1.0)).pvalue)


def derived_figures(new: dict[str, float], prev: dict[str, float], n_forget: int) -> dict[str, float]:
    """Comparisons the gates read: forget gap (signed) and p-value, retain and test drops from the parent."""
    correct = int(round(new["acc_forget"] * n_forget)) if n_forget else 0
    return {
        "forget_gap": new["acc_forget"] - new["acc_test"] if n_forget else float("nan"),
        "forget_p": forget_p_value(correct, n_forget, new["acc_test"]),
        "retain_drop": prev["acc_retain"] - new["acc_retain"],
        "test_drop": prev["acc_test"] - new["acc_test"],
    }


GATE_RULES = (  # gate, the figure it reads, the passing condition, the rule as the ledger states it
    ("forget_alpha", "forget_p", lambda v, t: v >= t,
     "two-sided binomial p-value of forget accuracy against test accuracy >= {t}"),
    ("max_forget_gap", "forget_gap", lambda v, t: abs(v) <= t, "|forget accuracy - test accuracy| <= {t}"),
    ("min_mia", "mia", lambda v, t: v >= t, "MIA efficacy on the forgotten examples >= {t}"),
    ("max_retain_drop", "retain_drop", lambda v, t: v <= t, "retain accuracy drop <= {t}"),
    ("max_test_drop", "test_drop", lambda v, t: v <= t, "test accuracy drop <= {t}"),
)
FORGET_GATES = ("forget_alpha", "max_forget_gap")


def apply_gates(figures: dict[str, float], gates: GateConfig) -> list[dict[str, Any]]:
    """One verdict per enabled gate: {gate, figure, value, threshold, passed, rule}; the two forget gates
    also say on which side of held-out accuracy the forget accuracy lies (side: above | below | equal)."""
    verdicts = []
    gap = float(figures.get("forget_gap", float("nan")))
    for gate, figure, ok, rule in GATE_RULES:
        threshold = getattr(gates, gate)
        if threshold is None:
            continue
        value = float(figures.get(figure, float("nan")))
        passed = bool(math.isfinite(value) and ok(value, threshold))  # an unmeasured figure fails its gate
        verdict = {"gate": gate, "figure": figure, "value": value, "threshold": threshold, "passed": passed,
                   "rule": rule.format(t=threshold)}
        if gate in FORGET_GATES and math.isfinite(gap):
            verdict["side"] = "above" if gap > 0 else "below" if gap < 0 else "equal"
        verdicts.append(verdict)
    return verdicts


def gate_failure(verdicts: list[dict[str, Any]]) -> str | None:
    """The sentence naming the gates a version missed, or None when it passed them all."""
    missed = [v for v in verdicts if not v["passed"]]
    if not missed:
        return None
    why = {"above": "forget accuracy above test accuracy: it forgets too little",
           "below": "forget accuracy below test accuracy: it forgets too much, itself a membership signal"}
    parts = [f"{v['gate']} ({v['figure']} = {v['value']:.4g}"
             + (f", {why[v['side']]}" if v.get("side") in why else "") + f"; needs {v['rule']})" for v in missed]
    return "the new version missed " + "; ".join(parts) + "; it is kept but not promoted."


def load_weights(path: Path, sha256: str) -> dict[str, Any]:
    """A state dict from `path`, after checking that its content matches `sha256` (CheckpointError)."""
    import torch

    from rumflow.artifacts.checkpoints import state_digest
    from rumflow.errors import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing; re-run the same command to recompute it.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); delete it and "
                              "re-run the same command to recompute it.") from exc
    if state_digest(state) != sha256:
        raise CheckpointError(f"checkpoint {path} does not match its sha256 {sha256[:12]}; delete it and re-run "
                              "the same command to recompute it.")
    return state


def unlearn_seed(seed: int, step: int, tier: str) -> int:
    """A distinct, reproducible seed for each tier's unlearning call of each step."""
    from rumflow.planning import TIERS

    return seed * 100_003 + step * 101 + TIERS.index(tier)


# ---------------------------------------------------------------------------------------------
# The service folder: service.yaml, ledger.sqlite, models/ (content-addressed weights), scores/, cache/


class ServiceFolder:
    """One service on disk; every path inside it is relative to `root`, so the folder can move."""

    def __init__(self, root: str | Path, cfg: ServiceConfig, ledger: Any):
        self.root = Path(root).resolve()
        self.cfg = cfg
        self.ledger = ledger

    @classmethod
    def open(cls, root: str | Path) -> "ServiceFolder":
        """Open an existing service folder and its store; ConfigError naming the fix when it is not one."""
        from rumflow.artifacts.ledger import Ledger, store_target

        root = Path(root).expanduser()
        if not (root / SERVICE_FILE).is_file():
            raise ConfigError(f"'{root}' is not a service folder (no {SERVICE_FILE}); create one with "
                              "`rumflow service create --config service.yaml` or pass --service DIR.")
        cfg = load_service_config(root / SERVICE_FILE)
        return cls(root, cfg, Ledger(store_target(cfg.store.url, root.resolve())))

    @property
    def store(self) -> str | Path:
        """The service's store: its database URL, or the path of its SQLite file."""
        from rumflow.artifacts.ledger import store_target

        return store_target(self.cfg.store.url, self.root)

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model_path(self, sha256: str) -> Path:
        return self.models / f"{sha256}.pt"

    def train_ids(self) -> np.ndarray:
        return np.load(self.root / TRAIN_IDS)
