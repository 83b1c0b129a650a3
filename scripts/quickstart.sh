#!/usr/bin/env bash
# nudge's quick start, in one command, on a Debian or Ubuntu machine with Rust:
#
#   scripts/quickstart.sh
#
# 1. Uses the NATS server on 127.0.0.1:4222, or, when none listens there,
#    starts one with JetStream (data in var/nats, log var/nats.log), installing
#    the `nats-server` package first when it is missing.
# 2. Builds nudge (cargo build --release).
# 3. Runs it on SQLite (var/quickstart.db) with mail written as .eml files into
#    var/mail, its HTTP API on 127.0.0.1:8080 (log var/nudge.log).
# 4. Publishes samples/events.jsonl and shows the mails nudge writes.
#
# On success nudge (and the nats-server it started) keep running, and it says
# how to stop them. Apart from cargo's target/, it writes only under var/, and
# every run starts over: it stops the nudge and nats-server of an earlier run
# (var/nudge.pid, var/nats.pid) and clears their data.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian installs nats-server into /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

HEALTH=http://127.0.0.1:8080/health
NUDGE=target/release/nudge
CONFIG=config.example.yaml

say() { printf '\n== %s\n' "$*"; }
die() { echo "error: $*" >&2; exit 1; }
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "this needs root (or sudo): $*"
    fi
}
apt_updated=0
apt_install() {
    command -v apt-get >/dev/null || die "$1 is missing; install it with your package manager and run this again"
    say "installing $* (apt-get)"
    if [ "$apt_updated" = 0 ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# The pid in pid file $1 when that process still runs and is program $2.
running() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}
# SIGTERM, up to 10 s to finish, then SIGKILL.
stop() {
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true
}
show_log() {
    echo "-- the end of $1:" >&2
    tail -n 30 "$1" >&2 || true
}
count_mail() { find var/mail -maxdepth 1 -name '*.eml' 2>/dev/null | wc -l; }

# On failure (or Ctrl-C) stop what this run started; on success leave it running.
started_nats=""
started_nudge=""
cleanup() {
    local rc=$?
    if [ "$rc" != 0 ]; then
        if [ -n "$started_nudge" ]; then
            stop "$started_nudge"
            rm -f var/nudge.pid
        fi
        if [ -n "$started_nats" ]; then
            echo "stopping the nats-server this run started" >&2
            stop "$started_nats"
            rm -f var/nats.pid
        fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

command -v cargo >/dev/null || die "cargo not found: install Rust first (https://rustup.rs)"
command -v curl >/dev/null || apt_install curl
mkdir -p var

# --- An earlier run's nudge and nats-server: stop them, this run starts over.
if pid=$(running var/nudge.pid nudge); then
    say "stopping the nudge of an earlier run (pid $pid)"
    stop "$pid"
fi
rm -f var/nudge.pid
if listening 8080; then
    die "something else listens on 127.0.0.1:8080, where nudge's HTTP API goes (a nudge started by hand?).
Stop it (e.g. \`ss -ltnp 'sport = :8080'\` shows its pid, then kill PID) and run $0 again."
fi
if pid=$(running var/nats.pid nats-server); then
    say "stopping the nats-server of an earlier run (pid $pid)"
    stop "$pid"
fi
rm -f var/nats.pid

# --- NATS with JetStream on 127.0.0.1:4222.
if listening 4222; then
    say "using the NATS server already listening on 127.0.0.1:4222 (it must have JetStream)"
    # A consumer of our own: a fresh database then reads the whole stream,
    # whatever an earlier run or another nudge on this server consumed.
    export NUDGE__NATS__CONSUMER="quickstart-$(date +%s)"
else
    command -v nats-server >/dev/null || apt_install nats-server
    say "starting nats-server with JetStream on 127.0.0.1:4222 (data var/nats, log var/nats.log)"
    rm -rf var/nats
    nohup nats-server -a 127.0.0.1 -p 4222 -js -sd var/nats </dev/null >var/nats.log 2>&1 &
    started_nats=$!
    echo "$started_nats" >var/nats.pid
    deadline=$((SECONDS + 10))
    until listening 4222; do
        if ! kill -0 "$started_nats" 2>/dev/null || ((SECONDS >= deadline)); then
            show_log var/nats.log
            die "nats-server did not start"
        fi
        sleep 0.2
    done
fi

# --- Build.
say "building nudge (cargo build --release; the first build takes a few minutes)"
cargo build --release

# --- Run nudge from a clean database and mail folder.
export NUDGE__DATABASE__URL=sqlite://var/quickstart.db
export NUDGE__MAIL__TRANSPORT=file
export NUDGE__MAIL__DIR=var/mail
export NUDGE__HTTP__LISTEN=127.0.0.1:8080
rm -rf var/mail var/quickstart.db var/quickstart.db-shm var/quickstart.db-wal
mkdir -p var/mail
say "starting nudge (log var/nudge.log)"
nohup "$NUDGE" run --config "$CONFIG" </dev/null >var/nudge.log 2>&1 &
started_nudge=$!
echo "$started_nudge" >var/nudge.pid
deadline=$((SECONDS + 30))
until curl -fsS -o /dev/null "$HEALTH" 2>/dev/null; do
    if ! kill -0 "$started_nudge" 2>/dev/null; then
        show_log var/nudge.log
        die "nudge exited"
    fi
    if ((SECONDS >= deadline)); then
        show_log var/nudge.log
        die "nudge did not answer on $HEALTH within 30 s"
    fi
    sleep 0.5
done
echo "nudge is up: $(curl -fsS "$HEALTH" 2>/dev/null || true)"

# --- Publish the sample events, as the shop would.
say "publishing samples/events.jsonl"
if ! RUST_LOG=${RUST_LOG:-warn} "$NUDGE" publish samples/events.jsonl --config "$CONFIG"; then
    show_log var/nudge.log
    die "publishing the sample events failed"
fi

# --- The mails: at least the 3 welcome mails, within a minute.
say "waiting for the mails in var/mail"
deadline=$((SECONDS + 60))
while [ "$(count_mail)" -lt 3 ]; do
    if ! kill -0 "$started_nudge" 2>/dev/null; then
        show_log var/nudge.log
        die "nudge exited"
    fi
    if ((SECONDS >= deadline)); then
        show_log var/nudge.log
        die "expected at least 3 mails in var/mail within 60 s, found $(count_mail)"
    fi
    sleep 0.5
done
# Let the rest land: until the count has not changed for 2 s (10 s at most).
n=$(count_mail)
stable=0
deadline=$((SECONDS + 10))
while ((stable < 4 && SECONDS < deadline)); do
    sleep 0.5
    m=$(count_mail)
    if [ "$m" = "$n" ]; then stable=$((stable + 1)); else n=$m stable=0; fi
done

for f in $(ls -tr var/mail/*.eml); do
    echo "-- $f"
    grep -E '^(To|Subject|X-Nudge-Rule):' "$f" | tr -d '\r' | sed 's/^/   /' || true
done

nats_note="the NATS server on 127.0.0.1:4222 was already running and is left as it was"
stop_cmd="kill $started_nudge"
if [ -n "$started_nats" ]; then
    nats_note="nats-server keeps running too (pid $started_nats, data var/nats, log var/nats.log)"
    stop_cmd="kill $started_nudge $started_nats"
fi
cat <<MSG

== done: $n mails from the sample events are in var/mail/ (one .eml file each).
nudge keeps running (pid $started_nudge, log var/nudge.log, database var/quickstart.db);
$nats_note.
Try:
  curl $HEALTH
  curl http://127.0.0.1:8080/api/rules
  curl http://127.0.0.1:8080/api/clients/c-cleo/log     # why Cleo got no quick_leave mail
Edit rules/*.rhai or templates/*, then publish events of your own (new ids) with
  $NUDGE publish FILE.jsonl --config $CONFIG
Stop it with:
  $stop_cmd
Running $0 again stops them and starts over from a clean var/.
MSG
