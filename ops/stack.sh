#!/usr/bin/env bash
# Local stack for aegis-audit integration tests and the quickstart, as plain processes
# on 127.0.0.1 (no Docker):
#
#   broker  tansu 0.6.0 (Kafka API), storage sqlite://  -> topics, records and committed
#           offsets survive a broker restart.                        127.0.0.1:${AEGIS_KAFKA_PORT:-9092}
#   aws     moto (S3 + DynamoDB on one port; ops/moto_serial.py serves one request at a time,
#           so conditional writes are atomic as in AWS) on an internal port, behind a small TCP
#           proxy (ops/tcp_proxy.py) on the public port: stop-aws stops only the proxy, so
#           S3/DynamoDB become unreachable while moto keeps its state.  127.0.0.1:${AEGIS_AWS_PORT:-5000}
#
# Data lives for one up..down lifecycle: it survives restart-broker, stop-/start-broker and
# stop-/start-aws; `down` stops everything and deletes the data (moto's state is in memory, so
# keeping only the broker's half would leave committed offsets pointing past a lost S3 state).
#
# Usage: ops/stack.sh COMMAND
#   up                     install what is missing, start both services, wait until ready (idempotent)
#   down                   stop the services this stack started and delete their data (logs are kept)
#   status                 print each service up/down with pid and port (exit 0 only if all are up)
#   env                    print `export` lines: eval "$(ops/stack.sh env)"
#   restart-broker [--kill]  stop (SIGTERM, or SIGKILL with --kill) and start the broker, wait until ready
#   stop-broker [--kill] | start-broker
#   stop-aws [--freeze]    S3+DynamoDB outage: stop the proxy (connections refused, open ones reset);
#                          --freeze instead SIGSTOPs moto (connections accepted, requests hang)
#   start-aws              end the outage (start the proxy / unfreeze moto); state is unchanged
#   install                only install the tools (tansu binary, Python venv, apt packages)
#   logs [broker|moto|awsproxy]  print the log file path(s)
#
# Environment:
#   AEGIS_TOOLS_DIR      tools reused across runs/clones   (default ~/.cache/aegis-audit/tools)
#   AEGIS_STACK_DIR      pids, logs, data of this stack     (default <repo>/.stack)
#   AEGIS_KAFKA_PORT     broker port                         (default 9092)
#   AEGIS_AWS_PORT       S3+DynamoDB port (the proxy)        (default 5000)
#   AEGIS_MOTO_PORT      moto's internal port                (default AEGIS_AWS_PORT + 10000)
#   AEGIS_KAFKA_STORAGE  sqlite (default, persistent) | memory (lost on broker restart; ~10x faster,
#                        but tansu 0.6 then answers a fetch from inside a record batch with the
#                        next batch, skipping records: benchmarks only, never the tests)
#   AEGIS_READY_TIMEOUT  seconds to wait for readiness       (default 60)
#   AEGIS_BASE_PYTHON    python used to create the venv      (default python3, needs >= 3.11)
#   AEGIS_SKIP_APT=1     do not run ops/install-deps.sh
set -euo pipefail
shopt -s inherit_errexit

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS_DIR=${AEGIS_TOOLS_DIR:-$HOME/.cache/aegis-audit/tools}
STACK_DIR=${AEGIS_STACK_DIR:-$REPO_ROOT/.stack}
HOST=127.0.0.1
KAFKA_PORT=${AEGIS_KAFKA_PORT:-9092}
AWS_PORT=${AEGIS_AWS_PORT:-5000}
MOTO_PORT=${AEGIS_MOTO_PORT:-$((AWS_PORT + 10000))}
KAFKA_STORAGE=${AEGIS_KAFKA_STORAGE:-sqlite}
READY_TIMEOUT=${AEGIS_READY_TIMEOUT:-60}
BASE_PYTHON=${AEGIS_BASE_PYTHON:-python3}

# Pinned tools. `libsql` gives the sqlite:// storage engine (persistent, local file);
# `dynostore` keeps memory:// available (AEGIS_KAFKA_STORAGE=memory).
TANSU_VERSION=0.6.0
TANSU_FEATURES=dynostore,libsql
TANSU_ROOT=$TOOLS_DIR/tansu-$TANSU_VERSION-${TANSU_FEATURES//,/-}
TANSU_BIN=$TANSU_ROOT/bin/tansu
REQ_FILE=$REPO_ROOT/tests/requirements.txt

RUN_DIR=$STACK_DIR/run
LOG_DIR=$STACK_DIR/logs
BROKER_DATA=$STACK_DIR/broker
AWS_DATA=$STACK_DIR/aws
PROXY_PY=$REPO_ROOT/ops/tcp_proxy.py
MOTO_PY=$REPO_ROOT/ops/moto_serial.py

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

case "$KAFKA_STORAGE" in
    sqlite) KAFKA_STORAGE_URL="sqlite://tansu.db" ;;   # relative to $BROKER_DATA (tansu's cwd)
    memory) KAFKA_STORAGE_URL="memory://tansu/" ;;
    *) die "AEGIS_KAFKA_STORAGE must be sqlite or memory, not '$KAFKA_STORAGE'" ;;
esac

# ---------------------------------------------------------------- python venv

py_version() {
    "$BASE_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null \
        || die "no usable python: '$BASE_PYTHON' (set AEGIS_BASE_PYTHON)"
}

# The venv is keyed by a hash of tests/requirements.txt (and the Python minor version),
# so a change of pins builds a fresh venv next to the old one.
venv_dir() {
    local pyv key
    pyv=$(py_version)
    key=$({ cat "$REQ_FILE"; echo "python=$pyv"; } | sha256sum | cut -c1-12)
    printf '%s/venv-py%s-%s' "$TOOLS_DIR" "$pyv" "$key"
}

ensure_venv() {
    VENV=$(venv_dir)
    PY=$VENV/bin/python
    [[ -f $VENV/.aegis-complete ]] && return 0
    # The pins (networkx 3.6, say) need 3.11: say so, not "pip install failed".
    "$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "'$BASE_PYTHON' is Python $(py_version); the test tools need 3.11 or newer (set AEGIS_BASE_PYTHON)"
    mkdir -p "$TOOLS_DIR"
    (
        flock 9
        [[ -f $VENV/.aegis-complete ]] && exit 0
        log "creating Python venv $VENV from tests/requirements.txt (about 40 s)"
        local t0=$SECONDS
        rm -rf "$VENV"
        nice -n 10 "$BASE_PYTHON" -m venv "$VENV"
        nice -n 10 "$VENV/bin/pip" install --disable-pip-version-check -q -r "$REQ_FILE" \
            || { rm -rf "$VENV"; die "pip install failed"; }
        "$VENV/bin/python" -c 'import moto, boto3, confluent_kafka, pyarrow, duckdb, cryptography' \
            || { rm -rf "$VENV"; die "venv import check failed"; }
        cp "$REQ_FILE" "$VENV/.aegis-complete"
        log "venv ready in $((SECONDS - t0)) s"
    ) 9>"$TOOLS_DIR/.venv.lock"
}

# ---------------------------------------------------------------- tansu binary

tansu_ok() {
    [[ -x $TANSU_BIN ]] && "$TANSU_BIN" --version 2>/dev/null | grep -q "$TANSU_VERSION"
}

ensure_tansu() {
    tansu_ok && return 0
    command -v cargo >/dev/null || die "cargo not found: needed once to build tansu $TANSU_VERSION"
    mkdir -p "$TOOLS_DIR"
    (
        flock 9
        tansu_ok && exit 0
        local build_log=$TANSU_ROOT.build.log t0=$SECONDS
        log "building tansu $TANSU_VERSION (features $TANSU_FEATURES) into $TANSU_ROOT"
        log "this takes 10-20 min on 2 cores, once per machine; log: $build_log"
        if ! nice -n 10 cargo install tansu --version "$TANSU_VERSION" --locked \
                --features "$TANSU_FEATURES" --root "$TANSU_ROOT" >"$build_log" 2>&1; then
            tail -n 30 "$build_log" >&2
            die "cargo install tansu failed (full log: $build_log)"
        fi
        tansu_ok || die "tansu built but '$TANSU_BIN --version' does not report $TANSU_VERSION"
        log "tansu built in $((SECONDS - t0)) s"
    ) 9>"$TOOLS_DIR/.tansu.lock"
}

ensure_apt() {
    [[ ${AEGIS_SKIP_APT:-0} == 1 ]] && return 0
    bash "$REPO_ROOT/ops/install-deps.sh" >&2
}

# ---------------------------------------------------------------- processes

pidfile() { printf '%s/%s.pid' "$RUN_DIR" "$1"; }
logfile() { printf '%s/%s.log' "$LOG_DIR" "$1"; }

# A string that must appear in the command line of the process we started.
marker() {
    case $1 in
        broker) printf '%s' "$TANSU_BIN" ;;
        moto) printf '%s' "moto_serial.py -H $HOST -p $MOTO_PORT" ;;
        awsproxy) printf '%s' "tcp_proxy.py --listen $HOST:$AWS_PORT" ;;
    esac
}

proc_starttime() {  # field 22 of /proc/PID/stat (comm may contain spaces: cut after ')')
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    awk '{print $20}' <<<"$stat"
}

proc_state() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    awk '{print $1}' <<<"$stat"
}

# Prints the pid if the pid file names a live process that is still the one we started
# (same start time, our command line); otherwise prints nothing and returns 1.
our_pid() {
    local name=$1 pf pid start cur_start cmd state
    pf=$(pidfile "$name")
    [[ -f $pf ]] || return 1
    read -r pid start <"$pf" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cur_start=$(proc_starttime "$pid") || return 1
    [[ $cur_start == "$start" ]] || return 1
    state=$(proc_state "$pid") || return 1
    [[ $state == Z ]] && return 1
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    # moto as launched before ops/moto_serial.py: still ours, so that `down` stops it.
    [[ $cmd == *"$(marker "$name")"* || ($name == moto && $cmd == *"moto_server -H $HOST -p $MOTO_PORT"*) ]] || return 1
    printf '%s' "$pid"
}

port_of() { case $1 in broker) echo "$KAFKA_PORT" ;; moto) echo "$MOTO_PORT" ;; awsproxy) echo "$AWS_PORT" ;; esac; }

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Launch "$@" detached (own session, stdin closed, output appended to the log) and record
# "pid starttime". The launched shell writes its own pid and then execs the service, so the pid
# is right even if setsid has to fork (when called with job control on).
launch() {
    local name=$1 cwd=$2; shift 2
    local log pid="" start tmp
    log=$(logfile "$name")
    tmp="$(pidfile "$name").new"
    mkdir -p "$RUN_DIR" "$LOG_DIR" "$cwd"
    rm -f "$tmp"
    printf '\n=== %s start %s: %s\n' "$name" "$(date -u +%FT%TZ)" "$*" >>"$log"
    (cd "$cwd" && exec setsid bash -c 'echo $$ >"$0"; exec "$@"' "$tmp" "$@" </dev/null >>"$log" 2>&1 7>&- 8>&- 9>&-) &
    for _ in $(seq 1 50); do
        [[ -s $tmp ]] && pid=$(<"$tmp") && [[ -n $pid ]] && break
        sleep 0.05
    done
    rm -f "$tmp"
    [[ -n $pid ]] || fail_start "$name" "$name did not start"
    # wait until the exec is done, so /proc shows the service's own command line
    for _ in $(seq 1 40); do
        [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) == *"$(marker "$name")"* ]] && break
        sleep 0.05
    done
    start=$(proc_starttime "$pid") || fail_start "$name" "$name exited immediately"
    printf '%s %s\n' "$pid" "$start" >"$(pidfile "$name")"
}

stop_service() {  # stop_service NAME [SIGNAL]
    local name=$1 sig=${2:-TERM} pid
    if ! pid=$(our_pid "$name"); then
        rm -f "$(pidfile "$name")"
        return 0
    fi
    [[ $(proc_state "$pid") == T ]] && kill -CONT "$pid" 2>/dev/null || true
    log "stopping $name (pid $pid, SIG$sig)"
    kill -"$sig" "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
        our_pid "$name" >/dev/null || break
        sleep 0.1
    done
    if our_pid "$name" >/dev/null; then
        log "$name did not exit in 10 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            our_pid "$name" >/dev/null || break
            sleep 0.1
        done
    fi
    our_pid "$name" >/dev/null && die "could not stop $name (pid $pid)"
    rm -f "$(pidfile "$name")"
}

fail_start() {  # fail_start NAME MESSAGE: show the log tail, stop what we started, exit
    local name=$1 msg=$2
    local lf first
    lf=$(logfile "$name")
    printf '[stack] ERROR: %s\n[stack] last lines of %s (this start):\n' "$msg" "$lf" >&2
    first=$(grep -n '^=== ' "$lf" 2>/dev/null | tail -n 1 | cut -d: -f1)
    tail -n "+${first:-1}" "$lf" 2>/dev/null | tail -n 40 >&2 || true
    stop_service "$name" KILL || true
    exit 1
}

# ---------------------------------------------------------------- readiness

broker_metadata_ok() {  # a real Kafka metadata request through librdkafka
    "$PY" - "$HOST:$KAFKA_PORT" <<'EOF' >/dev/null 2>&1
import sys
from confluent_kafka.admin import AdminClient
a = AdminClient({"bootstrap.servers": sys.argv[1], "log_level": 0,
                 "socket.connection.setup.timeout.ms": 2000})
md = a.list_topics(timeout=3)
sys.exit(0 if md.brokers else 1)
EOF
}

s3_ok() {  # s3_ok PORT: S3 ListBuckets answered (by moto, directly or through the proxy)
    "$PY" - "http://$HOST:$1/" <<'EOF' >/dev/null 2>&1
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    body = r.read()
sys.exit(0 if r.status == 200 and b"ListAllMyBucketsResult" in body else 1)
EOF
}

wait_ready() {  # wait_ready NAME CHECK_FN
    local name=$1 check=$2 deadline=$((SECONDS + READY_TIMEOUT)) port
    port=$(port_of "$name")
    while ((SECONDS < deadline)); do
        our_pid "$name" >/dev/null || fail_start "$name" "$name exited during startup"
        if port_open "$port" && "$check"; then
            return 0
        fi
        sleep 0.3
    done
    fail_start "$name" "$name not ready on $HOST:$port after ${READY_TIMEOUT}s"
}

# ---------------------------------------------------------------- services

start_broker() {
    local pid
    if pid=$(our_pid broker); then
        # memory:// mis-serves fetches from inside a batch: the tests must never run on it by
        # accident (a benchmark's broker left running), nor a benchmark on sqlite://.
        local running
        running=$(tr '\0' ' ' <"/proc/$pid/cmdline" | grep -o 'storage-engine [a-z]*://' | cut -d' ' -f2 || true)
        [[ -z $running || $running == "${KAFKA_STORAGE_URL%%//*}//" ]] \
            || die "the running broker uses ${running} storage, not $KAFKA_STORAGE (AEGIS_KAFKA_STORAGE): run 'bash ops/stack.sh down' first"
        broker_metadata_ok || wait_ready broker broker_metadata_ok
        log "broker already up (pid $pid, $HOST:$KAFKA_PORT)"
        return 0
    fi
    port_open "$KAFKA_PORT" && die "port $HOST:$KAFKA_PORT is in use by a process this stack did not start (set AEGIS_KAFKA_PORT)"
    local t0=$SECONDS url="tcp://$HOST:$KAFKA_PORT"
    launch broker "$BROKER_DATA" \
        env -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT NO_COLOR=1 RUST_LOG="${AEGIS_TANSU_LOG:-warn}" \
        "$TANSU_BIN" broker \
        --cluster-id aegis-local \
        --listener-url "$url" \
        --advertised-listener-url "$url" \
        --storage-engine "$KAFKA_STORAGE_URL"
    wait_ready broker broker_metadata_ok
    log "broker up (pid $(our_pid broker), $HOST:$KAFKA_PORT, storage $KAFKA_STORAGE_URL in $BROKER_DATA) in $((SECONDS - t0)) s"
}

moto_ok() { s3_ok "$MOTO_PORT"; }
proxy_ok() { s3_ok "$AWS_PORT"; }

start_moto() {
    local pid
    if pid=$(our_pid moto); then
        if [[ $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) != *"$(marker moto)"* ]]; then
            log "WARNING: moto (pid $pid) was started without ops/moto_serial.py: its conditional writes are not atomic. Replace it with: bash ops/stack.sh down && bash ops/stack.sh up (all the stack's data, the broker's included, is lost)"
        fi
        if [[ $(proc_state "$pid") == T ]]; then
            log "unfreezing moto (pid $pid)"
            kill -CONT "$pid"
        fi
        moto_ok || wait_ready moto moto_ok
        return 0
    fi
    port_open "$MOTO_PORT" && die "port $HOST:$MOTO_PORT (moto, internal) is in use by a process this stack did not start (set AEGIS_MOTO_PORT)"
    if our_pid broker >/dev/null; then
        log "WARNING: moto was not running while the broker was: S3/DynamoDB start empty, the broker keeps its data"
    fi
    local t0=$SECONDS
    launch moto "$AWS_DATA" \
        env AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1 \
        "$VENV/bin/python" "$MOTO_PY" -H "$HOST" -p "$MOTO_PORT"
    wait_ready moto moto_ok
    log "moto (S3+DynamoDB) up (pid $(our_pid moto), internal $HOST:$MOTO_PORT) in $((SECONDS - t0)) s"
}

start_proxy() {
    local pid
    if pid=$(our_pid awsproxy); then
        proxy_ok || wait_ready awsproxy proxy_ok
        return 0
    fi
    port_open "$AWS_PORT" && die "port $HOST:$AWS_PORT is in use by a process this stack did not start (set AEGIS_AWS_PORT)"
    launch awsproxy "$AWS_DATA" \
        "$VENV/bin/python" "$PROXY_PY" --listen "$HOST:$AWS_PORT" --target "$HOST:$MOTO_PORT"
    wait_ready awsproxy proxy_ok
}

start_aws() {
    local already=""
    our_pid moto >/dev/null && our_pid awsproxy >/dev/null && [[ $(proc_state "$(our_pid moto)") != T ]] && already="already "
    start_moto
    start_proxy
    log "aws (S3+DynamoDB) ${already}up on $HOST:$AWS_PORT (proxy pid $(our_pid awsproxy) -> moto pid $(our_pid moto))"
}

stop_aws() {  # outage: the public port goes away, moto keeps its state
    if [[ ${1:-} == --freeze ]]; then
        local pid
        pid=$(our_pid moto) || die "moto is not running"
        kill -STOP "$pid"
        log "moto frozen with SIGSTOP (pid $pid): $HOST:$AWS_PORT accepts connections but never answers; start-aws ends it"
    else
        stop_service awsproxy
        log "S3+DynamoDB unreachable on $HOST:$AWS_PORT (moto keeps its state); start-aws ends the outage"
    fi
}

# ---------------------------------------------------------------- commands

with_lock() {
    mkdir -p "$STACK_DIR"
    exec 8>"$STACK_DIR/.lock"
    flock -w 300 8 || die "another ops/stack.sh holds $STACK_DIR/.lock"
}

cmd_install() {
    ensure_apt
    ensure_venv
    ensure_tansu
}

cmd_up() {
    local t0=$SECONDS
    cmd_install
    with_lock
    if ! our_pid moto >/dev/null && ! our_pid broker >/dev/null && [[ -d $BROKER_DATA ]]; then
        # moto's state is gone (it lives in memory): start the broker empty too, to stay consistent.
        log "fresh start: removing old broker data in $BROKER_DATA"
        rm -rf "$BROKER_DATA"
    fi
    start_aws
    start_broker
    log "stack up in $((SECONDS - t0)) s (state in $STACK_DIR). Use: eval \"\$(bash ops/stack.sh env)\""
}

cmd_down() {
    with_lock
    stop_service broker
    stop_service awsproxy
    stop_service moto
    rm -rf "$BROKER_DATA" "$AWS_DATA" "$RUN_DIR"
    log "stack down (data removed; logs kept in $LOG_DIR)"
}

status_line() {  # status_line LABEL NAME -> prints, returns 1 unless up
    local label=$1 name=$2 pid port state note=""
    port=$(port_of "$name")
    if pid=$(our_pid "$name"); then
        state=up
        [[ $(proc_state "$pid") == T ]] && state=frozen
        printf '%-8s %-7s pid=%-8s %s:%-6s log=%s\n' "$label" "$state" "$pid" "$HOST" "$port" "$(logfile "$name")"
        [[ $state == up ]]
    else
        port_open "$port" && note="  (port in use by a process this stack did not start)"
        printf '%-8s %-7s pid=%-8s %s:%-6s%s\n' "$label" down - "$HOST" "$port" "$note"
        return 1
    fi
}

cmd_status() {
    local rc=0
    status_line broker broker || rc=1
    status_line aws awsproxy || rc=1
    status_line moto moto || rc=1
    [[ $KAFKA_STORAGE == sqlite ]] && printf 'broker storage: %s in %s\n' "$KAFKA_STORAGE_URL" "$BROKER_DATA"
    return $rc
}

cmd_env() {
    local venv
    venv=$(venv_dir)
    printf 'export %s=%q\n' \
        AEGIS_KAFKA__BROKERS "$HOST:$KAFKA_PORT" \
        AWS_ACCESS_KEY_ID testing \
        AWS_SECRET_ACCESS_KEY testing \
        AWS_REGION us-east-1 \
        AWS_DEFAULT_REGION us-east-1 \
        AEGIS_S3__ENDPOINT_URL "http://$HOST:$AWS_PORT" \
        AEGIS_DYNAMODB__ENDPOINT_URL "http://$HOST:$AWS_PORT" \
        AEGIS_PYTHON "$venv/bin/python" \
        AEGIS_STACK_DIR "$STACK_DIR" \
        AEGIS_TEST_BROKERS "$HOST:$KAFKA_PORT" \
        AEGIS_TEST_AWS_ENDPOINT "http://$HOST:$AWS_PORT"
}

need_running_tools() { ensure_venv; tansu_ok || ensure_tansu; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        env) cmd_env ;;
        install) cmd_install ;;
        restart-broker)
            need_running_tools; with_lock
            if [[ ${1:-} == --kill ]]; then stop_service broker KILL; else stop_service broker; fi
            start_broker ;;
        stop-broker)
            with_lock
            if [[ ${1:-} == --kill ]]; then stop_service broker KILL; else stop_service broker; fi ;;
        start-broker) need_running_tools; with_lock; start_broker ;;
        stop-aws) with_lock; stop_aws "$@" ;;
        start-aws) ensure_venv; with_lock; start_aws ;;
        logs)
            case ${1:-} in
                broker | moto | awsproxy) logfile "$1"; echo ;;
                *) for n in broker moto awsproxy; do logfile "$n"; echo; done ;;
            esac ;;
        -h | --help | help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
