#!/usr/bin/env bash
# The multi-user tracking set-up on one host: PostgreSQL (Debian's `postgresql` package, a cluster of our
# own in a folder, no systemd or Debian "main" cluster needed) holding MLflow's tracking database (`mlflow`)
# and Optuna's studies (`optuna`), and an MLflow tracking server on it that keeps artifacts in a folder and
# serves them over HTTP (clients upload and download through the server, they need no shared disk).
#
#   scripts/tracking_server.sh [flags] start | stop | status
#
# Settings, from the environment or from flags before the command:
#   TRACKING_STATE        --state DIR        state folder: pgdata/, socket/, logs/, mlflow.pid, artifacts/
#                                            (default: <project>/.tracking)
#   TRACKING_PG_PORT      --pg-port N        PostgreSQL port (default 5433: beside a system PostgreSQL on 5432)
#   TRACKING_MLFLOW_PORT  --mlflow-port N    MLflow server port (default 5000)
#   TRACKING_HOST         --host ADDR        address the MLflow server (and PostgreSQL) listen on (127.0.0.1)
#   TRACKING_MLFLOW_WORKERS                  MLflow server worker processes (default 2: a 2-core machine)
#   TRACKING_START_TIMEOUT_S                 seconds to wait for MLflow's /health (default 120)
#   TRACKING_MLFLOW_OPTS                     more `mlflow server` options, e.g. "--allowed-hosts mlflow.lab:5000"
#   MLFLOW / VENV                            the mlflow that serves (default: $VENV/bin/mlflow, VENV=.venv)
#   PGBIN                                    PostgreSQL's server binaries (default: the newest
#                                            /usr/lib/postgresql/*/bin)
#
# Security: this is a local, single-host set-up. The cluster trusts every connection that comes from this
# host (unix socket, 127.0.0.1, ::1) without a password, and refuses all others (pg_hba.conf has no other
# line). A server shared by several machines needs passwords (scram-sha-256 lines in pg_hba.conf, a role per
# user), TLS, and MLflow's --allowed-hosts / basic-auth: see docs/tracking_server.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${TRACKING_STATE:-$ROOT/.tracking}"
PG_PORT="${TRACKING_PG_PORT:-5433}"
MLFLOW_PORT="${TRACKING_MLFLOW_PORT:-5000}"
HOST="${TRACKING_HOST:-127.0.0.1}"
WORKERS="${TRACKING_MLFLOW_WORKERS:-2}"
START_TIMEOUT_S="${TRACKING_START_TIMEOUT_S:-120}"
read -r -a MLFLOW_OPTS <<<"${TRACKING_MLFLOW_OPTS:-}"
VENV="${VENV:-$ROOT/.venv}"
export MLFLOW_DISABLE_TELEMETRY=true
# MLflow 3's job runner (huey consumers, 8 processes here) serves GenAI features (scorers, trace jobs) this
# project does not use; off, the server is 2 processes lighter per worker on a small machine. Set it to true
# to have them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
    echo "tracking_server.sh: error: $*" >&2
    exit 1
}

cmd=""
while [ $# -gt 0 ]; do
    case "$1" in
        --state) STATE="$2"; shift 2 ;;
        --pg-port) PG_PORT="$2"; shift 2 ;;
        --mlflow-port) MLFLOW_PORT="$2"; shift 2 ;;
        --host) HOST="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        start | stop | status) cmd="$1"; shift ;;
        *) die "unknown argument '$1' (expected start, stop or status; --help lists the settings)" ;;
    esac
done
[ -n "$cmd" ] || die "no command (expected start, stop or status; --help lists the settings)"
for port in "$PG_PORT" "$MLFLOW_PORT"; do
    [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "port '$port': expected 1-65535"
done
[ "$PG_PORT" != "$MLFLOW_PORT" ] || die "PostgreSQL and MLflow cannot share port $PG_PORT"
# pg_ctl passes the server options through a shell: a state folder with blanks would be split.
[[ "$STATE" != *[[:space:]]* ]] || die "state folder '$STATE' contains blanks: choose another (--state / TRACKING_STATE)"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"

PGDATA="$STATE/pgdata"
SOCKDIR="$STATE/socket"
LOGS="$STATE/logs"
ARTIFACTS="$STATE/artifacts"
MLFLOW_PID="$STATE/mlflow.pid"
MLFLOW_LOG="$LOGS/mlflow.log"
PG_LOG="$LOGS/postgres.log"
# Clients on this host; with --host 0.0.0.0 the server is reached under the host's name.
CLIENT_HOST="$HOST"
[ "$HOST" != 0.0.0.0 ] || CLIENT_HOST="$(hostname -f 2>/dev/null || hostname)"
MLFLOW_URI="http://$CLIENT_HOST:$MLFLOW_PORT"
# +psycopg2: SQLAlchemy 2.1 (requirements.lock) maps a bare postgresql:// to psycopg 3, which the lock does not
# install ("No module named 'psycopg'"); psycopg2-binary is the driver it pins.
BACKEND_URI="postgresql+psycopg2://postgres@127.0.0.1:$PG_PORT/mlflow"
OPTUNA_URI="postgresql+psycopg2://postgres@$CLIENT_HOST:$PG_PORT/optuna"

# --- PostgreSQL -------------------------------------------------------------------------------------------

find_pgbin() {
    if [ -n "${PGBIN:-}" ]; then
        [ -x "$PGBIN/initdb" ] || die "PGBIN=$PGBIN has no initdb: point it at PostgreSQL's server binaries"
        return
    fi
    local initdb
    initdb="$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$initdb" ] || die "PostgreSQL's server binaries are missing (no /usr/lib/postgresql/*/bin/initdb): run" \
        "\`make postgres\` or \`apt-get install -y postgresql\` (sudo when not root), or set PGBIN"
    PGBIN="$(dirname "$initdb")"
}

# PostgreSQL refuses to run as root: as root its binaries run as the `postgres` system user, which owns the
# data and socket folders; any other user runs them as itself.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_running() {
    [ -f "$PGDATA/PG_VERSION" ] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1
}

# Something accepts TCP connections on 127.0.0.1:$1 (bash's /dev/tcp: no extra tool needed).
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

prepare_folders() {
    mkdir -p "$PGDATA" "$SOCKDIR" "$LOGS" "$ARTIFACTS"
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || die "no 'postgres' system user to run PostgreSQL as (root cannot):" \
            "reinstall Debian's package (apt-get install --reinstall -y postgresql-common) or run as another user"
        chown postgres: "$PGDATA" "$SOCKDIR" "$LOGS"
        runuser -u postgres -- test -x "$STATE" || die "the postgres user cannot reach $STATE (a parent folder" \
            "is not traversable, e.g. a 0700 temp folder): choose a state folder under a world-traversable path"
    fi
    chmod 700 "$PGDATA"
    # A unix socket path holds at most 107 bytes.
    local sock="$SOCKDIR/.s.PGSQL.$PG_PORT"
    [ "${#sock}" -le 107 ] || die "socket path $sock is longer than 107 bytes: choose a shorter state folder"
}

init_cluster() {
    if [ -f "$PGDATA/PG_VERSION" ]; then
        local have want
        have="$(cat "$PGDATA/PG_VERSION")"
        want="$("$PGBIN/postgres" --version | sed -E 's/.* ([0-9]+)(\.[0-9]+)*.*/\1/')"
        [ "$have" = "$want" ] || die "$PGDATA was made by PostgreSQL $have, these binaries are $want ($PGBIN):" \
            "set PGBIN=/usr/lib/postgresql/$have/bin, or pg_dump it with $have and start from an empty state folder"
        return
    fi
    echo "creating the PostgreSQL cluster in $PGDATA"
    # trust: every connection that reaches the server is let in, and only this host's can (see the header).
    as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --no-locale >"$LOGS/initdb.log" 2>&1 ||
        die "initdb failed: see $LOGS/initdb.log"
}

start_postgres() {
    if pg_running; then
        local port
        port="$(sed -n 4p "$PGDATA/postmaster.pid")"
        [ "$port" = "$PG_PORT" ] || die "PostgreSQL of $STATE already runs on port $port, not $PG_PORT:" \
            "stop it first (scripts/tracking_server.sh --state $STATE stop) or use --pg-port $port"
        echo "PostgreSQL already running (port $PG_PORT, data $PGDATA)"
        return
    fi
    port_in_use "$PG_PORT" && die "port $PG_PORT is in use by another program: choose another with" \
        "TRACKING_PG_PORT=<port> (or --pg-port), or stop that program"
    local listen=127.0.0.1
    case "$HOST" in 127.0.0.1 | localhost) ;; 0.0.0.0 | '*') listen='*' ;; *) listen="127.0.0.1,$HOST" ;; esac
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PG_LOG" -w -t 60 \
        -o "-c port=$PG_PORT -c listen_addresses=$listen -c unix_socket_directories=$SOCKDIR" start >/dev/null ||
        { tail -n 20 "$PG_LOG" >&2 || true; die "PostgreSQL did not start: see $PG_LOG"; }
    echo "PostgreSQL started (port $PG_PORT, data $PGDATA, log $PG_LOG)"
}

create_databases() {
    local db
    for db in mlflow optuna; do
        if [ -z "$(as_pg "$PGBIN/psql" -h "$SOCKDIR" -p "$PG_PORT" -U postgres -d postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
            as_pg "$PGBIN/createdb" -h "$SOCKDIR" -p "$PG_PORT" -U postgres "$db"
            echo "created database $db"
        fi
    done
}

stop_postgres() {
    if pg_running; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null
        echo "PostgreSQL stopped"
    else
        echo "PostgreSQL was not running"
    fi
}

# --- MLflow -----------------------------------------------------------------------------------------------

find_mlflow() {
    MLFLOW="${MLFLOW:-$VENV/bin/mlflow}"
    if [ ! -x "$MLFLOW" ]; then
        MLFLOW="$(command -v mlflow || true)"
        [ -n "$MLFLOW" ] || die "no mlflow in $VENV/bin or on PATH: run \`make setup\`, or set VENV / MLFLOW"
    fi
}

mlflow_pid() {
    local pid
    [ -f "$MLFLOW_PID" ] || return 1
    pid="$(cat "$MLFLOW_PID")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

healthy() {
    curl -fsS --max-time 2 "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1
}

wait_healthy() {
    local pid="$1" deadline=$((SECONDS + START_TIMEOUT_S))
    until healthy; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$MLFLOW_LOG" >&2 || true
            rm -f "$MLFLOW_PID"
            die "the MLflow server exited during start-up: see $MLFLOW_LOG"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$MLFLOW_LOG" >&2 || true
            stop_mlflow >/dev/null
            die "the MLflow server did not answer /health within ${START_TIMEOUT_S}s (stopped again): see" \
                "$MLFLOW_LOG; raise TRACKING_START_TIMEOUT_S on a slow machine"
        fi
        sleep 0.5
    done
}

start_mlflow() {
    local pid
    if pid="$(mlflow_pid)"; then
        wait_healthy "$pid"
        echo "MLflow server already running (pid $pid, $MLFLOW_URI)"
        return
    fi
    port_in_use "$MLFLOW_PORT" && die "port $MLFLOW_PORT is in use by another program: choose another with" \
        "TRACKING_MLFLOW_PORT=<port> (or --mlflow-port), or stop that program"
    find_mlflow
    # Its own session (setsid): `stop` ends the server and the workers it forks as one process group.
    setsid "$MLFLOW" server --backend-store-uri "$BACKEND_URI" --serve-artifacts --artifacts-destination "$ARTIFACTS" \
        --host "$HOST" --port "$MLFLOW_PORT" --workers "$WORKERS" "${MLFLOW_OPTS[@]}" >>"$MLFLOW_LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$MLFLOW_PID"
    wait_healthy "$pid"
    echo "MLflow server started (pid $pid, log $MLFLOW_LOG, artifacts $ARTIFACTS)"
}

stop_mlflow() {
    local pid i
    if ! pid="$(mlflow_pid)"; then
        rm -f "$MLFLOW_PID"
        echo "MLflow server was not running"
        return
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for i in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$MLFLOW_PID"
    echo "MLflow server stopped"
}

# --- commands ---------------------------------------------------------------------------------------------

case "$cmd" in
    start)
        # Both ports checked before anything starts: a busy MLflow port must not leave PostgreSQL running.
        if ! mlflow_pid >/dev/null; then
            port_in_use "$MLFLOW_PORT" && die "port $MLFLOW_PORT is in use by another program: choose another" \
                "with TRACKING_MLFLOW_PORT=<port> (or --mlflow-port), or stop that program"
        fi
        find_pgbin
        prepare_folders
        init_cluster
        start_postgres
        create_databases
        start_mlflow
        cat <<MSG

Point the pipeline at it:
  export MLFLOW_TRACKING_URI=$MLFLOW_URI
      (or tracking.uri: $MLFLOW_URI in params.yaml)
  tune.storage: $OPTUNA_URI
      (params.yaml: the Optuna studies of tune@, parallel workers included)
Stop it: scripts/tracking_server.sh --state $STATE stop
MSG
        case "$HOST" in
            127.0.0.1 | localhost) ;;
            *) echo "Other machines: PostgreSQL lets in only this host's connections; give each user a role with a" \
                "password first (docs/tracking_server.md), then tune.storage: postgresql+psycopg2://<role>@$CLIENT_HOST:$PG_PORT/optuna" ;;
        esac
        ;;
    stop)
        stop_mlflow
        if [ -f "$PGDATA/PG_VERSION" ]; then
            find_pgbin
            stop_postgres
        else
            echo "PostgreSQL was not running (no cluster in $PGDATA)"
        fi
        ;;
    status)
        up=0
        if pid="$(mlflow_pid)" && healthy; then
            echo "MLflow server: running (pid $pid, $MLFLOW_URI, artifacts $ARTIFACTS)"
        elif [ -n "${pid:-}" ]; then
            echo "MLflow server: process $pid alive but /health does not answer (see $MLFLOW_LOG)"
            up=1
        else
            echo "MLflow server: stopped"
            up=1
        fi
        if [ -f "$PGDATA/PG_VERSION" ] && find_pgbin && pg_running; then
            echo "PostgreSQL: running (port $(sed -n 4p "$PGDATA/postmaster.pid"), data $PGDATA)"
        else
            echo "PostgreSQL: stopped"
            up=1
        fi
        # 3: not running, as pg_ctl status and LSB init scripts say it.
        [ "$up" = 0 ] || exit 3
        ;;
esac
