#!/usr/bin/env bash
# Prove the multi-machine pieces of docs/cluster.md on this one machine, everything on loopback:
#   1. a real PostgreSQL (Debian's package; installed if absent) in a temporary folder, on a free port;
#   2. `prefect server start` on 127.0.0.1 with that database behind it (not SQLite);
#   3. a 2-node Ray cluster: two `ray start` processes (head + worker node, 1 CPU each);
#   4. a small experiment run through them (`rumflow run --set runner.kind=ray --set runner.address=...`,
#      PREFECT_API_URL -> the server, results under one shared folder), and the same config on the default
#      runner (threads);
#   5. the two steps.parquet are equal except wall times and host (checkpoint digests included).
# Everything it started is stopped on exit (only its own processes, by id: never `ray stop`, which would
# stop every Ray cluster of this user on the machine). Usage: scripts/cluster_check.sh [--keep]
# (--keep leaves the temporary folder for inspection). Exit status 0 only if every check passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RUMFLOW_VENV:-$ROOT/.venv}"
KEEP=0
[[ "${1:-}" == "--keep" ]] && KEEP=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1 \
       PREFECT_SERVER_ANALYTICS_ENABLED=false
unset PREFECT_API_URL

TMP="$(mktemp -d /tmp/rumflow-cluster.XXXXXX)"
chmod 755 "$TMP"
SHARED="$TMP/shared"           # stands for the filesystem every node mounts at the same path
mkdir -p "$SHARED" "$TMP/logs"
START=$(date +%s)
SERVER_PID="" RAY_HEAD_PID="" RAY_NODE_PID="" PG_DATA="" PG_BIN=""
declare -a SUMMARY=()

say() { printf '[cluster_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
note() { SUMMARY+=("$*"); say "$*"; }
die() { say "FAILED: $*"; exit 1; }

free_port() {  # a TCP port free on 127.0.0.1 right now
  "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

stop_pid() {  # SIGTERM one process we started, SIGKILL it after $2 seconds
  local pid="$1" grace="${2:-20}"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq "$((grace * 2))"); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL "$pid" 2>/dev/null || true
}

as_pg() {  # run a PostgreSQL tool as the postgres user when we are root (initdb refuses root)
  if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cleanup() {
  local rc=$?
  set +e
  say "stopping what this script started"
  stop_pid "$RAY_NODE_PID" 30
  stop_pid "$RAY_HEAD_PID" 30
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM -- "-$SERVER_PID" 2>/dev/null  # its own process group (started with setsid): uvicorn too
    for _ in $(seq 40); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null
  fi
  if [[ -n "$PG_DATA" && -f "$PG_DATA/postmaster.pid" ]]; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1
  fi
  # Ray's daemons (gcs_server, raylet, workers) carry this run's temp folder in their command lines:
  # whatever survived its `ray start --block` parent is ended here, one process id at a time.
  local left
  left=$(pgrep -f -- "$TMP/" | grep -vx "$$" || true)
  for pid in $left; do kill -TERM "$pid" 2>/dev/null; done
  sleep 1
  for pid in $(pgrep -f -- "$TMP/" | grep -vx "$$" || true); do kill -KILL "$pid" 2>/dev/null; done
  [[ -n "$left" ]] && say "ended $(echo $left | wc -w) leftover process(es) of this run's Ray cluster"
  if [[ $KEEP == 1 ]]; then say "kept $TMP"; else rm -rf "$TMP"; fi
  echo
  echo "=============================== cluster_check summary ==============================="
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  echo "  wall time: $(( $(date +%s) - START )) s; load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
  if [[ $rc == 0 ]]; then echo "  RESULT: PASS"; else echo "  RESULT: FAIL (exit $rc)"; fi
  echo "====================================================================================="
  exit $rc
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# ------------------------------------------------------------------------------------------ PostgreSQL
find_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }
PG_BIN="$(find_pg_bin)"
if [[ -z "$PG_BIN" || ! -x "$PG_BIN/initdb" ]]; then
  say "PostgreSQL is not installed: apt-get update && apt-get install -y postgresql"
  [[ "$(id -u)" == 0 ]] || die "installing postgresql needs root (run: sudo apt-get install -y postgresql)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  PG_BIN="$(find_pg_bin)"
fi
[[ -x "$PG_BIN/initdb" ]] || die "no initdb under /usr/lib/postgresql/*/bin after installing postgresql"
PG_VERSION="$("$PG_BIN/postgres" --version)"
PG_PORT=$(free_port)
PG_DATA="$TMP/pg/data"
PG_PASSWORD="$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(16))')"
mkdir -p "$TMP/pg/socket"
printf '%s\n' "$PG_PASSWORD" >"$TMP/pg/pwfile"
chmod 600 "$TMP/pg/pwfile"
[[ "$(id -u)" == 0 ]] && chown -R postgres "$TMP/pg"
as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U rumflow --pwfile="$TMP/pg/pwfile" -A scram-sha-256 -E UTF8 \
  >"$TMP/logs/initdb.log" 2>&1 || { cat "$TMP/logs/initdb.log"; die "initdb"; }
as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$TMP/pg/postgres.log" -w -t 120 \
  -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $TMP/pg/socket" start >/dev/null \
  || { cat "$TMP/pg/postgres.log"; die "pg_ctl start"; }
export PGPASSWORD="$PG_PASSWORD"
"$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U rumflow -d postgres -qc "CREATE DATABASE prefect" \
  || die "CREATE DATABASE"
note "PostgreSQL: $PG_VERSION on 127.0.0.1:$PG_PORT (data $PG_DATA), database 'prefect'"

# ------------------------------------------------------------------------------------ Prefect server
API_PORT=$(free_port)
export PREFECT_HOME="$TMP/prefect-home"
DB_URL="postgresql+asyncpg://rumflow:$PG_PASSWORD@127.0.0.1:$PG_PORT/prefect"
PREFECT_API_DATABASE_CONNECTION_URL="$DB_URL" PREFECT_SERVER_API_HOST=127.0.0.1 \
  PREFECT_SERVER_API_PORT="$API_PORT" PREFECT_UI_API_URL="http://127.0.0.1:$API_PORT/api" \
  setsid "$VENV/bin/prefect" server start --host 127.0.0.1 --port "$API_PORT" \
  >"$TMP/logs/prefect-server.log" 2>&1 &
SERVER_PID=$!
export PREFECT_API_URL="http://127.0.0.1:$API_PORT/api"
for i in $(seq 360); do
  curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 30 "$TMP/logs/prefect-server.log"; die "prefect server exited"; }
  [[ $i == 360 ]] && { tail -n 30 "$TMP/logs/prefect-server.log"; die "prefect server not healthy in 180 s"; }
  sleep 0.5
done
grep -qi "sqlite" "$TMP/logs/prefect-server.log" && die "the server log mentions SQLite"
TABLES=$("$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U rumflow -d prefect -tAc \
  "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('flow_run','task_run')")
[[ "$TABLES" == 2 ]] || die "Prefect's tables are not in the PostgreSQL database"
note "Prefect server: $("$VENV/bin/prefect" version 2>/dev/null | awk '/^Version/{print $2}') at $PREFECT_API_URL, its tables in PostgreSQL"

# ------------------------------------------------------------------------------ Ray: head + one node
RAY_PORT=$(free_port)
RAY="$VENV/bin/ray"
# Token authentication with this run's own token (every node and every driver reads it from the file
# named here; on several machines, copy the file to each): never the user's ~/.ray/auth_token.
mkdir -p "$TMP/ray-auth"
"$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$TMP/ray-auth/token"
chmod 600 "$TMP/ray-auth/token"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TMP/ray-auth/token"
common=(--node-ip-address=127.0.0.1 --num-cpus=1 --num-gpus=0 --block --disable-usage-stats)
setsid "$RAY" start --head --port="$RAY_PORT" --include-dashboard=false "${common[@]}" \
  --temp-dir="$TMP/ray-head" --ray-client-server-port="$(free_port)" \
  --dashboard-agent-listen-port="$(free_port)" --runtime-env-agent-port="$(free_port)" \
  >"$TMP/logs/ray-head.log" 2>&1 &
RAY_HEAD_PID=$!
RAY_ADDRESS_HP="127.0.0.1:$RAY_PORT"
for i in $(seq 240); do
  grep -q "block forever" "$TMP/logs/ray-head.log" 2>/dev/null && break
  kill -0 "$RAY_HEAD_PID" 2>/dev/null || { tail -n 30 "$TMP/logs/ray-head.log"; die "ray head exited"; }
  [[ $i == 240 ]] && { tail -n 30 "$TMP/logs/ray-head.log"; die "ray head not up in 120 s"; }
  sleep 0.5
done
setsid "$RAY" start --address="$RAY_ADDRESS_HP" "${common[@]}" --temp-dir="$TMP/ray-node" \
  --dashboard-agent-listen-port="$(free_port)" --runtime-env-agent-port="$(free_port)" \
  >"$TMP/logs/ray-node.log" 2>&1 &
RAY_NODE_PID=$!
for i in $(seq 240); do
  grep -q "block forever" "$TMP/logs/ray-node.log" 2>/dev/null && break
  kill -0 "$RAY_NODE_PID" 2>/dev/null || { tail -n 30 "$TMP/logs/ray-node.log"; die "ray node exited"; }
  [[ $i == 240 ]] && { tail -n 30 "$TMP/logs/ray-node.log"; die "ray node not up in 120 s"; }
  sleep 0.5
done
# Both nodes take work: two 1-CPU tasks at once must land on the two nodes (each has one CPU).
NODES=$("$VENV/bin/python" - "$RAY_ADDRESS_HP" <<'EOF'
import sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
for _ in range(60):
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) == 2:
        break
    time.sleep(1)
@ray.remote(num_cpus=1)
def where() -> str:
    time.sleep(3)
    return ray.get_runtime_context().get_node_id()
ids = ray.get([where.remote(), where.remote()])
print(len(alive), len(set(ids)))
EOF
)
[[ "$NODES" == "2 2" ]] || die "expected 2 alive Ray nodes each running a task, got (alive, used) = $NODES"
note "Ray: $("$RAY" --version | awk '{print $3}') cluster at $RAY_ADDRESS_HP, 2 nodes (1 CPU each), a probe task ran on each"
# What Ray listens on (Ray replaces a loopback --node-ip-address by the machine's own address, and some
# of its gRPC servers bind every interface): reported, not hidden.
RAY_PIDS=$(pgrep -f -- "$TMP/ray-" | paste -sd'|' || true)
RAY_BINDS=$(ss -ltnpH 2>/dev/null | grep -E "pid=(${RAY_PIDS:-none})," | awk '{print $4}' | sed -E 's/:[0-9]+$//' \
  | sort | uniq -c | awk '{printf "%s%s x%s", (NR>1?", ":""), $2, $1}')
note "Ray node IP: $(sed 's/\x1b\[[0-9;]*m//g' "$TMP/logs/ray-head.log" | grep -o 'Local node IP: [0-9.]*' | grep -o '[0-9.]*$'); listening sockets by address: ${RAY_BINDS:-none seen}"

# ---------------------------------------------------------------------------------- the experiment
TINY=(--set name=cluster-check --set train.epochs=3 --set "proxies=[confidence,holdout_retraining]"
      --set holdout.max_epochs=3 --set forget.steps=2 --set forget.per_tier=5
      --set rum.low.method=none --set rum.mid.method=finetune --set rum.mid.epochs=1
      --set rum.high.method=neggrad_plus --set rum.high.epochs=1
      --set vanilla.method=neggrad_plus --set vanilla.epochs=1 --set "seeds=[0]" --set device=cpu)
run_one() {  # $1: label; the rest: extra rumflow arguments
  local label="$1"; shift
  local t0=$(date +%s)
  ( cd "$SHARED" && "$VENV/bin/rumflow" run --out "$SHARED/$label" "${TINY[@]}" "$@" ) \
    >"$TMP/logs/run-$label.log" 2>&1 || { tail -n 40 "$TMP/logs/run-$label.log"; die "rumflow run ($label)"; }
  note "rumflow run ($label): $(( $(date +%s) - t0 )) s -> $SHARED/$label/cluster-check/steps.parquet"
}
run_one ray --set runner.kind=ray --set "runner.address=$RAY_ADDRESS_HP"
run_one default

# ------------------------------------------------------------------------------------------ checks
"$VENV/bin/python" - "$SHARED/ray/cluster-check" "$SHARED/default/cluster-check" <<'EOF' | tee "$TMP/logs/compare.txt"
import sys
import pandas as pd
TIME = {"seconds", "seconds_step", "retrain_seconds", "rte", "rte_step", "host", "efficient"}
ray_df, default_df = (pd.read_parquet(f"{d}/steps.parquet") for d in sys.argv[1:3])
keep = [c for c in default_df.columns if c not in TIME]
pd.testing.assert_frame_equal(ray_df[keep], default_df[keep])
assert ray_df["checkpoint"].notna().all() and ray_df["checkpoint"].nunique() > 1
print(f"steps.parquet equal: {len(ray_df)} rows x {len(keep)} columns compared "
      f"({ray_df['checkpoint'].nunique()} distinct checkpoint digests, all equal); "
      f"ignored: {', '.join(sorted(TIME & set(default_df.columns)))}")
EOF
note "$(tail -n1 "$TMP/logs/compare.txt")"
# The runs are in the server's PostgreSQL database, every task run Completed (Cached counts as Completed).
read -r FLOWS TASKS NOTDONE < <("$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U rumflow -d prefect -tA -F' ' -c \
  "SELECT (SELECT count(*) FROM flow_run WHERE state_type='COMPLETED'),
          (SELECT count(*) FROM task_run),
          (SELECT count(*) FROM task_run WHERE state_type IS DISTINCT FROM 'COMPLETED')")
[[ "$FLOWS" -ge 2 && "$TASKS" -gt 0 ]] || die "PostgreSQL holds $FLOWS completed flow runs and $TASKS task runs"
note "PostgreSQL holds $FLOWS completed flow runs and $TASKS task runs ($NOTDONE not Completed)"
[[ "$NOTDONE" == 0 ]] || die "$NOTDONE task runs are not Completed"
