"""`rumflow select`: search per-tier methods and hyperparameters on validation requests (flows/select.py).

Bad input is refused before Prefect is imported or any work starts, with one sentence and exit 2, as
`rumflow run` does: the select config and its base, the output folder, the device and data, the
runner's package, a Prefect server that does not answer, a folder held by another live run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

TOP_ROWS = 5  # rows per strategy printed on the console (summary.md has every trial)


def cmd_select(args: argparse.Namespace) -> int:
    """Run (or resume) a selection; print the frontier table and the selected settings."""
    import pandas as pd

    from rumflow import cli
    from rumflow.artifacts import runfolder
    from rumflow.artifacts.runfolder import check_writable
    from rumflow.errors import ConfigError
    from rumflow.selection import frontier_markdown, load_select_config

    if not args.config:
        raise ConfigError("rumflow select needs --config select.yaml (see configs/select.yaml).")
    cfg = load_select_config(args.config, args.set)
    cli._prefect_environment(args.verbose)
    run_dir = Path(args.out).expanduser().resolve() / cfg.folder
    check_writable(run_dir)
    from rumflow.flows.select import check_select_feasible

    check_select_feasible(cfg)
    cli._check_runner(cfg.base)
    cli._check_api()
    with runfolder.hold(run_dir, cfg.digest(), cfg.folder) as held:
        from rumflow.flows.select import configured

        cli._task_log_level(args.verbose)
        cli._quiet_user_tracebacks()
        run_dir = cli._run_flow(configured(cfg), cfg, str(args.out), held)
    sweep = pd.read_parquet(run_dir / "sweep.parquet")
    print(frontier_markdown(sweep, TOP_ROWS))
    print()
    for r in sweep[sweep["selected"]].itertuples():
        print(f"selected {r.strategy}: {r.settings} (ToW {r.tow:.3f}, ToW-MIA {r.tow_mia:.3f}, "
              f"RTE {r.rte_step_max:.3f})")
    for strategy in dict.fromkeys(sweep["strategy"]):
        if not sweep.loc[sweep["strategy"] == strategy, "selected"].any():
            print(f"no {strategy} trial meets the cap RTE <= {cfg.rule.max_rte:g}, so none is selected and "
                  "selected.yaml is not written.")
    if (run_dir / "selected.yaml").exists():
        print(f"\nSelected config: {run_dir / 'selected.yaml'} (report it: rumflow run --config "
              f"{run_dir / 'selected.yaml'})")
    print(f"Results: {run_dir}")
    return 0


def add_commands(sub: Any) -> None:
    """Register `rumflow select` on the `rumflow` subparsers."""
    p = sub.add_parser("select", help="select per-tier methods and hyperparameters on validation requests")
    p.add_argument("--config", help="select config (YAML); see configs/select.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one value, e.g. --set rule.max_rte=0.1 or --set base.train.epochs=5")
    p.add_argument("--out", default="runs", help="parent folder of <name>-select/ (default: runs)")
    p.add_argument("--verbose", action="store_true", help="show every task run's log lines")
    p.set_defaults(func=cmd_select)
