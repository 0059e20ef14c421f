"""The memorization flow: estimate true memorization and grade every configured proxy against it."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger

from rumflow import records
from rumflow.artifacts.tables import write_parquet
from rumflow.artifacts import runfolder
from rumflow.config import ExperimentConfig, dump_config, validate_config
from rumflow.flows.experiment import Submitter
from rumflow.runtime import check_feasible, dataset_on


@flow(name="rumflow-memorization", log_prints=True)
def memorization(config: ExperimentConfig, out: str = "runs") -> str:
    """Write `<out>/<name>/memorization.parquet` and `proxies.parquet` (first seed); return the folder."""
    cfg = validate_config(config)
    check_feasible(cfg)
    run_dir = Path(out).expanduser().resolve() / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    with runfolder.hold(run_dir, cfg.digest(), cfg.name):
        runfolder.mark_incomplete(run_dir)
        written = _memorization(cfg, run_dir)
        runfolder.finish(run_dir, dump_config(cfg), written, cfg.digest())
    return str(run_dir)


def _memorization(cfg: ExperimentConfig, run_dir: Path) -> list[Path]:
    """The memorization flow's work; returns the files it wrote."""
    s = Submitter(cfg, run_dir)
    seed = cfg.seeds[0]
    truth_f = s.submit("memorization", f"R{cfg.memorization.models}", data=cfg.data, model=cfg.model,
                       train=cfg.train, memorization=cfg.memorization, device=cfg.device, workdir=s.workdir)
    original_f = s.train(seed, None, f"s{seed}/original", events=True)
    score_f = {p: s.scores(p, seed, original_f, original_f, f"s{seed}/{p}")
               for p in cfg.proxies if p != "memorization"}
    truth, original = truth_f.result(), original_f.result()
    get_run_logger().info(f"true memorization from {cfg.memorization.models} models in {truth.seconds:.0f}s")
    scores = {p: (f.result().load(run_dir), f.result().seconds) for p, f in score_f.items()}
    scores["memorization"] = (truth.load(run_dir), truth.seconds)
    train = dataset_on(cfg.data, cfg.device).train
    labels = pd.DataFrame({"example_id": train.ids(), "label": train.y.cpu().numpy()})
    table = labels.merge(truth.load(run_dir).rename(columns={"score": "memorization"}), on="example_id")
    base = records.provenance(cfg)
    return [write_parquet(table, run_dir / "memorization.parquet"),
            write_parquet(records.proxies_table(base, cfg.forget.per_tier, train.ids(), truth.load(run_dir),
                                                {seed: scores}, {seed: original.seconds}), run_dir / "proxies.parquet")]
