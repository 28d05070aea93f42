#!/usr/bin/env bash
# The platform's services on this box, all bound to 127.0.0.1:
#   Prefect server (UI + API) :4200, a process worker on the `blip2-local` pool, an MLflow server :5000,
#   a Ray head (GCS :6379, dashboard / job API :8265).
#
#   infra/local/stack.sh up       start what is not running yet (logs and pid files under $BLIP2_STACK_DIR)
#   infra/local/stack.sh status   one line per service; exit 1 if any is down
#   infra/local/stack.sh down     stop everything it started, leaving no process behind
#   source "$BLIP2_STACK_DIR/env.sh"   point prefect / mlflow / ray clients at the stack
#
# Settings (environment): BLIP2_STACK_DIR (default <repo>/runs/stack), VENV (<repo>/.venv), PREFECT_PORT,
# MLFLOW_PORT, RAY_PORT, RAY_DASHBOARD_PORT, RAY_NUM_CPUS (2), BLIP2_POOL (blip2-local), STACK_SERVICES
# (default "prefect worker mlflow ray": start a subset, e.g. "prefect worker" when MLflow and Ray run elsewhere).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STACK_DIR="${BLIP2_STACK_DIR:-$ROOT/runs/stack}"
VENV="${VENV:-$ROOT/.venv}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
RAY_PORT="${RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_NUM_CPUS="${RAY_NUM_CPUS:-2}"
POOL="${BLIP2_POOL:-blip2-local}"
SERVICES="${STACK_SERVICES:-prefect worker mlflow ray}"
LOGS="$STACK_DIR/logs"
PIDS="$STACK_DIR/pids"
BIN="$VENV/bin"

export PREFECT_HOME="$STACK_DIR/prefect"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_WORKER_QUERY_SECONDS=2
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export RAY_ADDRESS="127.0.0.1:$RAY_PORT"
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false

wanted() { [[ " $SERVICES " == *" $1 "* ]]; }
pid_of() { [[ -f "$PIDS/$1.pid" ]] && cat "$PIDS/$1.pid"; }
alive() { local pid; pid="$(pid_of "$1")" && [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; }
ray_alive() { "$BIN/ray" status --address "$RAY_ADDRESS" >/dev/null 2>&1; }

wait_for() {  # wait_for NAME URL SECONDS
    local name="$1" url="$2" limit="$3" waited=0
    until curl -fs -o /dev/null "$url"; do
        if ! alive "$name"; then echo "stack: $name exited while starting; see $LOGS/$name.log" >&2; tail -20 "$LOGS/$name.log" >&2; return 1; fi
        (( waited++ >= limit )) && { echo "stack: $name not answering at $url after ${limit}s; see $LOGS/$name.log" >&2; return 1; }
        sleep 1
    done
}

start() {  # start NAME COMMAND...: a new session (process group) per service, so `down` stops all its children
    local name="$1"; shift
    if alive "$name"; then echo "stack: $name already running (pid $(pid_of "$name"))"; return 0; fi
    setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! >"$PIDS/$name.pid"
    echo "stack: started $name (pid $!), log $LOGS/$name.log"
}

write_env() {
    cat >"$STACK_DIR/env.sh" <<EOF
# source this file to talk to the local stack
export PREFECT_HOME="$PREFECT_HOME" PREFECT_API_URL="$PREFECT_API_URL" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export MLFLOW_TRACKING_URI="$MLFLOW_TRACKING_URI"
export RAY_ADDRESS="$RAY_ADDRESS" RAY_API_SERVER_ADDRESS="http://127.0.0.1:$RAY_DASHBOARD_PORT" RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
EOF
}

up() {
    [[ -x "$BIN/prefect" ]] || { echo "stack: $BIN/prefect not found: run 'make venv' first (or set VENV)" >&2; exit 2; }
    mkdir -p "$LOGS" "$PIDS" "$PREFECT_HOME" "$STACK_DIR/mlflow/artifacts"
    if wanted prefect; then
        start prefect "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
        wait_for prefect "http://127.0.0.1:$PREFECT_PORT/api/health" 90
    fi
    if wanted mlflow; then
        start mlflow "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
            --backend-store-uri "sqlite:///$STACK_DIR/mlflow/mlflow.db" \
            --artifacts-destination "$STACK_DIR/mlflow/artifacts"
        wait_for mlflow "http://127.0.0.1:$MLFLOW_PORT/health" 90
    fi
    if wanted ray; then
        if ray_alive; then echo "stack: ray head already running at $RAY_ADDRESS"
        else
            "$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" --dashboard-host 127.0.0.1 \
                --dashboard-port "$RAY_DASHBOARD_PORT" --num-cpus "$RAY_NUM_CPUS" --disable-usage-stats \
                --temp-dir "${RAY_TMPDIR:-/tmp/ray}" >"$LOGS/ray.log" 2>&1 \
                || { echo "stack: ray start failed; see $LOGS/ray.log" >&2; tail -20 "$LOGS/ray.log" >&2; exit 1; }
            echo "stack: started ray head at $RAY_ADDRESS (dashboard http://127.0.0.1:$RAY_DASHBOARD_PORT)"
        fi
    fi
    if wanted worker; then
        "$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 \
            || "$BIN/prefect" work-pool create "$POOL" --type process >/dev/null
        (cd "$ROOT" && start worker "$BIN/prefect" worker start --pool "$POOL" --type process \
            --name "blip2-local-$(hostname)")
    fi
    write_env
    echo "stack: up. Prefect UI http://127.0.0.1:$PREFECT_PORT  MLflow UI http://127.0.0.1:$MLFLOW_PORT  Ray dashboard http://127.0.0.1:$RAY_DASHBOARD_PORT"
    echo "stack: clients: source $STACK_DIR/env.sh"
}

stop_group() {  # stop_group NAME SIGNAL...: signal the service's process group, then wait, then SIGKILL
    local name="$1"; shift
    local pid; pid="$(pid_of "$name" || true)"
    [[ -n "$pid" ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        for sig in "$@"; do kill "-$sig" -- "-$pid" 2>/dev/null || true; sleep 1; done
        for _ in $(seq 1 30); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
        if kill -0 -- "-$pid" 2>/dev/null; then
            echo "stack: $name did not stop, killing it"; kill -KILL -- "-$pid" 2>/dev/null || true
        fi
        echo "stack: stopped $name"
    fi
    rm -f "$PIDS/$name.pid"
}

down() {
    stop_group worker INT INT   # a Prefect worker ignores SIGTERM for 25 s+; two SIGINTs stop it
    if wanted ray && [[ -x "$BIN/ray" ]] && ray_alive; then
        "$BIN/ray" stop --force >/dev/null 2>&1 || true
        echo "stack: stopped ray"
    fi
    stop_group mlflow TERM
    stop_group prefect TERM
}

status() {
    local down=0
    for name in prefect worker mlflow; do
        wanted "$name" || continue
        if alive "$name"; then echo "$name: up (pid $(pid_of "$name"))"; else echo "$name: down"; down=1; fi
    done
    if wanted ray; then
        if ray_alive; then echo "ray: up ($RAY_ADDRESS)"; else echo "ray: down"; down=1; fi
    fi
    return $down
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
