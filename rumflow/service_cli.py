"""The service commands: `rumflow service create|step`, `rumflow request add|list|withdraw`, `rumflow serve`,
`rumflow ledger`, `rumflow model export`, `rumflow audit`.

Commands that only read or write the store (request, ledger, model export) never import Prefect; the
others set Prefect's environment before importing it (settings are read at import).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from rumflow.errors import ConfigError


def _prefect_env() -> None:
    """Offline-friendly Prefect settings unless the user set them (PREFECT_API_URL is honoured)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")


def service_dir(arg: str | None) -> Path:
    """The service folder: --service, else $RUMFLOW_SERVICE, else the only service under ./services."""
    from rumflow.service import SERVICE_FILE

    if arg:
        return Path(arg)
    if os.environ.get("RUMFLOW_SERVICE"):
        return Path(os.environ["RUMFLOW_SERVICE"])
    found = sorted(p.parent for p in Path("services").glob(f"*/{SERVICE_FILE}"))
    if len(found) == 1:
        return found[0]
    where = "no service under ./services" if not found else f"{len(found)} services under ./services"
    raise ConfigError(f"which service? There is {where}; pass --service DIR or set RUMFLOW_SERVICE=DIR.")


def _open(args: argparse.Namespace):
    from rumflow.service import ServiceFolder

    return ServiceFolder.open(service_dir(args.service))


def _run(flow_fn: Any, service: Path) -> dict[str, Any]:
    """Run a service flow in this process and wait until the API has its task runs' final states; a step
    that failed its requests (the run ends Failed after its commit) returns its result too."""
    from rumflow.flows.service import StepFailed

    state = flow_fn(str(service), return_state=True)
    try:
        from rumflow.cli import _wait_for_records

        _wait_for_records(state.state_details.flow_run_id)
    except ImportError:  # the experiment CLI's helper moved; the run itself is complete
        pass
    if state.is_failed():
        failure = state.result(raise_on_failure=False)
        if isinstance(failure, StepFailed):
            return failure.result
    return state.result()


def cmd_service_create(args: argparse.Namespace) -> int:
    """Validate the config, write the service folder, make version 0."""
    from rumflow.service import load_service_config

    cfg = load_service_config(args.config)
    _prefect_env()
    from rumflow.flows.service import create_folder, service_create

    root = create_folder(cfg, Path(args.dir) if args.dir else Path("services") / cfg.name)
    result = _run(service_create, root)
    print(f"service {cfg.name} created in {root}: version 0 = {result['sha256'][:12]} ({result['origin']})")
    print(f"next: rumflow request add --service {root} --ids 12,907,3311")
    print(f"      rumflow serve --service {root} --interval 3600   (with `prefect server start` running)")
    return 0


def cmd_service_step(args: argparse.Namespace) -> int:
    """Run one service step now (no schedule): the queued requests become one new version."""
    folder = _open(args)
    _prefect_env()
    from rumflow.flows.service import service_step

    result = _run(service_step, folder.root)
    print(_step_line(result))
    return 0 if result.get("status") in ("done", "idle", "busy") else 1


def _step_line(result: dict[str, Any]) -> str:
    status = result.get("status")
    if status == "idle":
        return "no queued request: nothing to do."
    if status == "busy":
        return "another run holds the service; nothing was done (the next run takes the queue)."
    version = result.get("version")
    head = f"step {result['step']}: " + (f"v{version} " if version is not None else "")
    if result.get("promoted"):
        return head + f"promoted ({result['sha256'][:12]}); requests {', '.join(result['requests'])} done."
    return head + f"not promoted: {result.get('reason')}"


def cmd_request_add(args: argparse.Namespace) -> int:
    """Validate and queue a request; one sentence and nothing stored when it is refused."""
    from rumflow.service import parse_id_file, parse_id_list

    if (args.ids is None) == (args.file is None):
        raise ConfigError("give the ids with --ids 12,907,3311 or --file ids.txt (one of them).")
    ids = parse_id_list(args.ids) if args.ids is not None else parse_id_file(args.file)
    folder = _open(args)
    req = folder.ledger.add_request(ids, folder.train_ids(), args.id, args.note)
    print(f"request {req['request_id']} queued: {req['n_examples']} examples (received {req['received_at']}).")
    return 0


def cmd_request_list(args: argparse.Namespace) -> int:
    """Every request with its state (and the reason of a failed or rejected one)."""
    folder = _open(args)
    rows = folder.ledger.requests()
    if not rows:
        print("no requests yet; add one with `rumflow request add --ids ...`.")
        return 0
    print(f"{'request':<12} {'state':<9} {'examples':>8}  {'received':<25} {'step':>4}  note / reason")
    for r in rows:
        extra = " | ".join(x for x in (r["note"], r["reason"]) if x)
        step = "" if r["step"] is None else str(r["step"])
        print(f"{r['request_id']:<12} {r['state']:<9} {r['n_examples']:>8}  {r['received_at']:<25} {step:>4}  {extra}")
    version, sha = folder.ledger.current()
    print(f"\nproduction model: v{version} ({sha[:12]}); {len(folder.ledger.forgotten())} examples forgotten.")
    return 0


def cmd_request_withdraw(args: argparse.Namespace) -> int:
    """Withdraw a queued request (it becomes rejected with the reason)."""
    folder = _open(args)
    folder.ledger.reject(args.request_id, args.reason)
    print(f"request {args.request_id} rejected: {args.reason}")
    return 0


def _check_server() -> str:
    """The URL of a reachable Prefect server, or a ConfigError saying what to start."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    start = ("start one with `prefect server start` (it listens on 127.0.0.1:4200) and set "
             "PREFECT_API_URL=http://127.0.0.1:4200/api, then serve again")
    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(f"serving needs a running Prefect server and PREFECT_API_URL is not set; {start}.")
    try:
        response = httpx.get(url.rstrip("/") + "/health", timeout=5)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ConfigError(f"no Prefect server answers at {url} ({type(exc).__name__}); {start}.") from None
    return url


def cmd_serve(args: argparse.Namespace) -> int:
    """Create the service's deployment with a schedule and serve it until interrupted."""
    folder = _open(args)
    if (args.interval is None) == (args.cron is None):
        raise ConfigError("give a schedule: --interval SECONDS or --cron \"0 2 * * *\" (one of them).")
    _prefect_env()
    url = _check_server()
    from prefect.deployments.runner import EntrypointType

    from rumflow.flows.service import service_step

    name = args.name or folder.cfg.name
    print(f"serving deployment rumflow-service-step/{name} on {url} "
          f"({'every %gs' % args.interval if args.interval else 'cron ' + args.cron}); Ctrl-C stops it.")
    service_step.serve(name=name, interval=args.interval, cron=args.cron, parameters={"service": str(folder.root)},
                       limit=1, description=f"erasure requests of service {folder.cfg.name} ({folder.root})",
                       tags=["rumflow-service"], entrypoint_type=EntrypointType.MODULE_PATH,
                       print_starting_message=False)
    return 0


LEDGER_SHOWN = ("acc_forget", "acc_test", "forget_p", "acc_retain", "retain_drop", "test_drop", "mia")


def ledger_frame(folder: Any):
    """The ledger as a DataFrame: one row per processed request, figures as columns, methods/gates as JSON."""
    import pandas as pd

    rows = []
    for r in folder.ledger.rows():
        flat = {k: v for k, v in r.items() if k not in ("figures", "methods", "gates", "step_requests")}
        flat["step_requests"] = ",".join(r["step_requests"])
        flat.update(r["figures"] or {})
        for g in r["gates"] or []:
            flat[f"gate_{g['gate']}"] = bool(g["passed"])
        flat["methods"] = json.dumps(r["methods"], sort_keys=True)
        flat["gates"] = json.dumps(r["gates"], sort_keys=True)
        rows.append(flat)
    return pd.DataFrame(rows)


def cmd_ledger(args: argparse.Namespace) -> int:
    """Print the ledger, or export it (and the audits) as Parquet or CSV."""
    import pandas as pd

    folder = _open(args)
    df = ledger_frame(folder)
    audits = pd.DataFrame([{**{k: v for k, v in a.items() if k != "figures"}, **a["figures"]}
                           for a in folder.ledger.audits()])
    if args.format:
        from rumflow.artifacts.tables import write_parquet, write_text

        out = Path(args.out) if args.out else folder.root / f"ledger.{args.format}"
        audit_out = out.with_name(out.stem + "-audits" + out.suffix)
        for frame, path in ((df, out), (audits, audit_out)):
            if args.format == "parquet":
                write_parquet(frame, path)
            else:
                write_text(frame.to_csv(index=False), path)
        print(f"{len(df)} ledger rows -> {out}; {len(audits)} audits -> {audit_out}")
        return 0
    if df.empty:
        print("the ledger is empty: no request has been processed yet.")
    else:
        cols = ["step", "request_id", "state", "n_examples", "tier_low", "tier_mid", "tier_high", "parent_version",
                "version", "promoted", *[c for c in LEDGER_SHOWN if c in df], "seconds", "completed_at"]
        with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format",
                               "{:.3f}".format):
            print(df[cols].to_string(index=False))
        for _, r in df[df["state"] != "done"].iterrows():
            print(f"  {r['request_id']}: {r['reason']}")
    if not audits.empty:
        print("\naudits (against a model retrained without every forgotten example):")
        with pd.option_context("display.float_format", "{:.3f}".format):
            print(audits[["audit", "version", "n_forgotten", "tow", "tow_mia", "seconds_retrain",
                          "completed_at"]].to_string(index=False))
    return 0


def cmd_model_export(args: argparse.Namespace) -> int:
    """Write the weights of one version as a plain state dict (torch.save)."""
    import io

    import torch

    from rumflow.artifacts.checkpoints import atomic_write_bytes
    from rumflow.service import load_weights

    folder = _open(args)
    row = folder.ledger.version(args.version)
    state = load_weights(folder.model_path(row["sha256"]), row["sha256"])
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(args.path), buf.getvalue())
    status = "production" if row["version"] == folder.ledger.current()[0] else (
        "promoted earlier" if row["promoted"] else "not promoted")
    print(f"v{row['version']} ({row['sha256'][:12]}, {status}) -> {args.path}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Train a retrain reference and record ToW / ToW-MIA of the current version in the ledger."""
    folder = _open(args)
    _prefect_env()
    from rumflow.flows.service import service_audit

    result = _run(service_audit, folder.root)
    print(f"audit of v{result['version']}: ToW {result['tow']:.3f}, ToW-MIA {result['tow_mia']:.3f} "
          f"(forget acc {result['acc_forget']:.3f} vs retrain {result['acc_forget_reference']:.3f})")
    return 0


def add_commands(sub: Any) -> None:
    """Register the service commands on the `rumflow` subparsers."""
    def with_service(p: argparse.ArgumentParser) -> None:
        p.add_argument("--service", help="the service folder (default: $RUMFLOW_SERVICE, or the only one under "
                       "./services)")

    service = sub.add_parser("service", help="create an erasure-request service or run one step of it")
    ssub = service.add_subparsers(dest="service_command", required=True)
    create = ssub.add_parser("create", help="create a service folder and its version 0 from a config")
    create.add_argument("--config", required=True, help="service config (YAML); see configs/service.yaml")
    create.add_argument("--dir", help="the service folder (default: services/<name>)")
    create.set_defaults(func=cmd_service_create)
    step = ssub.add_parser("step", help="process the queued requests now, as one step")
    with_service(step)
    step.set_defaults(func=cmd_service_step)

    request = sub.add_parser("request", help="submit, list or withdraw erasure requests")
    rsub = request.add_subparsers(dest="request_command", required=True)
    add = rsub.add_parser("add", help="validate and queue a request")
    with_service(add)
    add.add_argument("--ids", help="comma-separated training example ids, e.g. 12,907,3311")
    add.add_argument("--file", help="a text file with one example id a line")
    add.add_argument("--id", help="the request's id (default: r<N>)")
    add.add_argument("--note", help="free text kept with the request (e.g. the ticket number)")
    add.set_defaults(func=cmd_request_add)
    lst = rsub.add_parser("list", help="every request and its state")
    with_service(lst)
    lst.set_defaults(func=cmd_request_list)
    wd = rsub.add_parser("withdraw", help="withdraw a queued request (state: rejected)")
    with_service(wd)
    wd.add_argument("request_id")
    wd.add_argument("--reason", default="withdrawn by the operator", help="why (kept in the ledger)")
    wd.set_defaults(func=cmd_request_withdraw)

    serve = sub.add_parser("serve", help="serve the service's deployment on a schedule (needs `prefect server start`)")
    with_service(serve)
    serve.add_argument("--interval", type=float, help="seconds between scheduled runs")
    serve.add_argument("--cron", help="a cron schedule, e.g. \"0 2 * * *\"")
    serve.add_argument("--name", help="deployment name (default: the service name)")
    serve.set_defaults(func=cmd_serve)

    ledger = sub.add_parser("ledger", help="the ledger of every step (print, or export with --format)")
    with_service(ledger)
    ledger.add_argument("--format", choices=["parquet", "csv"], help="export instead of printing")
    ledger.add_argument("--out", help="export path (default: <service>/ledger.<format>)")
    ledger.set_defaults(func=cmd_ledger)

    model = sub.add_parser("model", help="export a model version")
    msub = model.add_subparsers(dest="model_command", required=True)
    export = msub.add_parser("export", help="write a version's weights as a plain state dict")
    with_service(export)
    export.add_argument("--version", type=int, required=True, help="version number (0 = the first model)")
    export.add_argument("path", help="output file (.pt)")
    export.set_defaults(func=cmd_model_export)

    audit = sub.add_parser("audit", help="measure ToW / ToW-MIA of the current version against a retrain")
    with_service(audit)
    audit.set_defaults(func=cmd_audit)
