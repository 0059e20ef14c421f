#!/usr/bin/env bash
# Check the Prefect UI in a real browser (headless Chromium): start a server on loopback with a temporary
# PREFECT_HOME, create a tiny service, submit a request, let the served deployment run it, run a tiny
# experiment against the same server, then screenshot the deployment page, the service flow-run graph, a
# service step artifact, the experiment's run graph (its chains), one chain's graph (its
# step subflows), one step's graph (its tasks) and one of its step artifacts into docs/ui/*.png and
# check the pages' text for the run's state, the units' names and the artifact's figures.
#
#   scripts/ui_check.sh            (about 3-6 minutes on 2 cores; needs `apt-get` only if chromium is absent)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/docs/ui"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
BIN="$(dirname "$PY")"
export PATH="$BIN:$PATH" OMP_NUM_THREADS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

if ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium package"
  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null
fi

WORK="$(mktemp -d /tmp/rumflow-ui-check.XXXXXX)"
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export PREFECT_HOME="$WORK/prefect-home" PREFECT_SERVER_API_PORT="$PORT"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api" PREFECT_RESULTS_LOCAL_STORAGE_PATH="$WORK/results"
for s in LATE_RUNS FOREMAN CANCELLATION_CLEANUP PAUSE_EXPIRATIONS REPOSSESSOR; do
  export "PREFECT_SERVER_SERVICES_${s}_ENABLED=false"  # not needed here; they lock SQLite on a busy machine
done
mkdir -p "$PREFECT_HOME" "$OUT"
UI="http://127.0.0.1:$PORT"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 3
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

echo "== prefect server on $UI (PREFECT_HOME=$PREFECT_HOME)"
setsid prefect server start --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 90); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 2; done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { tail -20 "$WORK/server.log"; echo "server did not start"; exit 1; }

echo "== service: create, one request, serve"
cat >"$WORK/service.yaml" <<'EOF'
name: ui-service
train: {epochs: 5}
holdout: {max_epochs: 2}
rum:
  low: {method: none}
  mid: {method: finetune, lr: 0.1, epochs: 2, batch_size: 64}
  high: {method: neggrad_plus, alpha: 0.95, lr: 0.01, epochs: 2, batch_size: 64}
evaluate: {mia_max_shadow: 300}
# 24 examples of a 5-epoch model: the binomial gate at its default 0.05 sits near the line here (p ~0.07);
# this script checks the UI, not the gate, so it asks for clear evidence before failing a version.
gates: {forget_alpha: 0.01}
EOF
SVC="$WORK/svc"
rumflow service create --config "$WORK/service.yaml" --dir "$SVC" 2>&1 | grep -v "^\s*$" | tail -3
IDS="$("$PY" -c "import numpy as np; print(','.join(map(str, np.load('$SVC/train_ids.npy')[::40][:24])))")"
rumflow request add --service "$SVC" --ids "$IDS" --note "ui check"
setsid rumflow serve --service "$SVC" --interval 15 >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 120); do
  state="$("$PY" - "$SVC" <<'EOF'
import sqlite3, sys
print(sqlite3.connect(f"{sys.argv[1]}/ledger.sqlite").execute("SELECT state FROM requests WHERE request_id='r1'").fetchone()[0])
EOF
)"
  [ "$state" = done ] || [ "$state" = failed ] && break
  sleep 3
done
echo "request r1: $state"
sleep 8  # let the flow run reach its final state in the API

echo "== a tiny experiment on the same server"
rumflow run --out "$WORK/runs" --set name=ui-tiny --set train.epochs=5 --set "proxies=[confidence,entropy]" \
  --set forget.steps=2 --set forget.per_tier=5 --set rum.mid.epochs=1 --set rum.high.epochs=1 \
  --set vanilla.epochs=1 --set "seeds=[0]" 2>&1 | tail -4

echo "== screenshots"
"$PY" - "$SVC" "$PREFECT_API_URL" "$UI" "$OUT" "$WORK" <<'EOF'
import json, os, re, sqlite3, subprocess, sys, tempfile
import httpx

svc, api, ui, out, work = sys.argv[1:]
db = sqlite3.connect(f"{svc}/ledger.sqlite")
flow_run_id, figures, version = db.execute("SELECT flow_run_id, figures, version FROM ledger WHERE request_id='r1'").fetchone()
figures = json.loads(figures)
post = lambda path, body: httpx.post(f"{api}{path}", json=body, timeout=30).json()
dep = [d for d in post("/deployments/filter", {}) if d["name"] == "ui-service"][0]
art = post("/artifacts/filter", {"artifacts": {"key": {"any_": ["ui-service-step-1"]}}})[0]
exp = [r for r in post("/flow_runs/filter", {"flows": {"name": {"any_": ["rumflow-experiment"]}},
                                             "sort": "START_TIME_DESC"}) if r["state_type"] == "COMPLETED"]
# the experiment's step tables are keyed <name>-...-step<k> (the middle part depends on the flow's version)
exp_arts = [a for a in post("/artifacts/filter", {"artifacts": {"key": {"like_": "step1"}}, "sort": "CREATED_DESC"})
            if (a.get("key") or "").startswith("ui-tiny-") and a["type"] == "table"]
# the experiment's units: its chain subflows (one per seed x proxy), and the step subflows of a chain
subflows = lambda parent: post("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [parent]}}})
chains = {r["name"]: r for r in subflows(exp[0]["id"])} if exp else {}
print("chain subflows of the experiment run:", ", ".join(sorted(chains)))
steps = {r["name"]: r for r in subflows(chains["s0/confidence"]["id"])} if "s0/confidence" in chains else {}
pages = {
    "service-deployment": f"{ui}/deployments/deployment/{dep['id']}",
    "service-flow-run": f"{ui}/runs/flow-run/{flow_run_id}",
    "service-step-artifact": f"{ui}/artifacts/artifact/{art['id']}",
    "experiment-flow-run": f"{ui}/runs/flow-run/{exp[0]['id']}" if exp else None,
    "experiment-chain-run": f"{ui}/runs/flow-run/{chains['s0/confidence']['id']}" if chains else None,
    "experiment-step-run": (f"{ui}/runs/flow-run/{steps['s0/confidence/step2']['id']}"
                            if "s0/confidence/step2" in steps else None),
    "experiment-step-artifact": f"{ui}/artifacts/artifact/{exp_arts[0]['id']}" if exp_arts else None,
}
flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1600,1000",
         "--hide-scrollbars"]
# the deployment page keeps loading its run list for a while: give it more virtual time
budget = {"service-deployment": 40000}

def chromium(name, *args):
    profile = tempfile.mkdtemp(dir=work)
    return subprocess.run(["chromium", *flags, f"--virtual-time-budget={budget.get(name, 15000)}",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=240)

def text_of(dom):
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))

checks = []
for name, url in pages.items():
    if url is None:
        checks.append((name, False, "not found in the API (no completed experiment run or step artifact)"))
        continue
    png = f"{out}/{name}.png"
    chromium(name, f"--screenshot={png}", url)
    text = text_of(chromium(name, "--dump-dom", url).stdout)
    if name == "service-deployment":
        need = ["ui-service", "rumflow-service-step", "Every 15 seconds", "Completed"]
    elif name.endswith("flow-run"):
        need = ["Completed"]
    elif name == "experiment-chain-run":
        need = ["s0/confidence", "Completed", "rumflow-chain"]
    elif name == "experiment-step-run":
        need = ["s0/confidence/step2", "Completed", "seed 0 | confidence | step 2"]
    elif name == "service-step-artifact":
        need = ["r1", f"v{version}", "pass", str(round(figures["acc_forget"], 4)), str(round(figures["acc_test"], 4))]
    else:
        need = ["rum", "vanilla", "retrain"]
    missing = [n for n in need if n not in text]
    size = os.path.getsize(png) if os.path.exists(png) else 0
    checks.append((name, not missing and size > 10_000, f"{png} ({size // 1024} KiB); page text has "
                   + (", ".join(repr(n) for n in need) if not missing else "NOT " + ", ".join(repr(n) for n in missing))))
print()
print(f"service run {flow_run_id}: v{version}, acc_forget {figures['acc_forget']:.4f}, acc_test {figures['acc_test']:.4f}, "
      f"forget_p {figures['forget_p']:.3f}, mia {figures['mia']:.3f}")
for name, ok, detail in checks:
    print(f"{'OK  ' if ok else 'FAIL'} {name}: {detail}")
sys.exit(0 if all(ok for _, ok, _ in checks) else 1)
EOF
