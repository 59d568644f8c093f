#!/usr/bin/env bash
# Private nginx and PostgreSQL for the tests:  sudo scripts/servers.sh start|stop|status
#
# Real forked daemons from the distribution (installed by scripts/setup.sh)
# for tests/root/accuracy/test_real_servers.py, and present on the machine
# while CI runs the host suite (.ci/run):
#   nginx       master + 2 worker processes, listening on 127.0.0.1:NGINX_PORT
#   PostgreSQL  its own cluster (initdb as user postgres), listening on
#               127.0.0.1:PG_PORT and a unix socket in PG_SOCKDIR, with a
#               pgbench database "bench" (pgbench -i -s 1)
# Everything lives in one directory, MEMTRACE_SERVERS_DIR (default
# /tmp/memtrace-servers; it must be reachable by the users postgres and
# www-data): configuration, data, logs, pid files. The ports are free high
# ports picked at the first start and kept while free. Loopback only; the
# system's own services (/etc/nginx, the "main" cluster, ports 80 and 5432)
# are never used or touched.
#
#   start   start what is not running (idempotent); prints the status
#   stop    stop everything this directory's servers run (nginx master and
#           workers, the postmaster and every backend), waiting at most
#           STOP_TIMEOUT seconds (default 20) before SIGKILL; idempotent
#   status  KEY=VALUE lines (the ports, socket dir, pids, binaries, ...);
#           exit 0 when both run, 1 otherwise
#
# Resource bounds: 2 nginx workers with 256 connections each; PostgreSQL
# with shared_buffers 64MB, max_connections 30, no fsync (scratch data).
set -euo pipefail

DIR="${MEMTRACE_SERVERS_DIR:-/tmp/memtrace-servers}"
STOP_TIMEOUT="${STOP_TIMEOUT:-20}"
NGX_DIR="$DIR/nginx"
PG_DIR="$DIR/postgres"
PG_DATA="$PG_DIR/data"
PG_SOCKDIR="$PG_DIR/sock"
PORTS="$DIR/ports"
PG_USER=postgres
NGX_USER=www-data

say() { echo "servers: $*" >&2; }
die() {
    echo "servers: error: $*" >&2
    exit 1
}

nginx_bin() { command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; } || true; }
# The newest PostgreSQL's bin directory (Debian: /usr/lib/postgresql/N/bin).
pg_bindir() {
    local d
    d="$(find /usr/lib/postgresql -maxdepth 3 -path '*/bin/postgres' -printf '%h\n' 2>/dev/null |
        sort -V | tail -n1)"
    [[ -n $d ]] && echo "$d"
    return 0
}

# A free TCP port on 127.0.0.1 (the kernel's pick).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port_free() {
    python3 -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

NGINX_PORT=""
PG_PORT=""
load_ports() {
    if [[ -f $PORTS ]]; then
        NGINX_PORT="$(sed -n 's/^NGINX_PORT=//p' "$PORTS")"
        PG_PORT="$(sed -n 's/^PG_PORT=//p' "$PORTS")"
    fi
}
save_ports() {
    printf 'NGINX_PORT=%s\nPG_PORT=%s\n' "$NGINX_PORT" "$PG_PORT" >"$PORTS"
}

# pid from a pid file, if that process is alive and runs COMM.
live_pid() {
    local file=$1 comm=$2 pid
    [[ -f $file ]] || return 1
    pid="$(head -n1 "$file" 2>/dev/null | tr -dc 0-9)"
    [[ -n $pid ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]] || return 1
    echo "$pid"
}
nginx_pid() { live_pid "$NGX_DIR/nginx.pid" nginx; }
pg_pid() { live_pid "$PG_DATA/postmaster.pid" postgres; }

# Is PID a live process (not a zombie)?
alive() {
    local st
    st="$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$1/status" 2>/dev/null)"
    [[ -n $st && $st != Z && $st != X ]]
}
# Wait up to $2 seconds for PID to end; status 0 when it did.
wait_gone() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        alive "$1" || return 0
        sleep 0.1
    done
    ! alive "$1"
}

children() { # direct children of PID
    local pid=$1
    cat /proc/"$pid"/task/*/children 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+$' || true
}

# --------------------------------------------------------------------------
# nginx

nginx_config() {
    mkdir -p "$NGX_DIR/html" "$NGX_DIR/tmp" "$NGX_DIR/logs"
    chmod 755 "$DIR" "$NGX_DIR" "$NGX_DIR/html"
    chown "$NGX_USER" "$NGX_DIR/tmp"
    echo "ok" >"$NGX_DIR/html/index.html"
    # a 256 KiB file: responses that go through sendfile and the page cache
    head -c 262144 /dev/zero | tr '\0' 'x' >"$NGX_DIR/html/big.html"
    cat >"$NGX_DIR/nginx.conf" <<EOF
# written by scripts/servers.sh
user $NGX_USER;
daemon on;
master_process on;
worker_processes 2;
pid $NGX_DIR/nginx.pid;
lock_file $NGX_DIR/nginx.lock;
error_log $NGX_DIR/logs/error.log warn;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path $NGX_DIR/tmp/body;
    proxy_temp_path $NGX_DIR/tmp/proxy;
    fastcgi_temp_path $NGX_DIR/tmp/fastcgi;
    uwsgi_temp_path $NGX_DIR/tmp/uwsgi;
    scgi_temp_path $NGX_DIR/tmp/scgi;
    sendfile on;
    keepalive_requests 100000;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $NGX_DIR/html;
        location / { }
    }
}
EOF
}

nginx_start() {
    local bin pid i
    bin="$(nginx_bin)"
    [[ -n $bin ]] || die "nginx not installed (scripts/setup.sh installs it)"
    if pid="$(nginx_pid)"; then
        say "nginx already running (master $pid, port $NGINX_PORT)"
        return 0
    fi
    if [[ -z $NGINX_PORT ]] || ! port_free "$NGINX_PORT"; then
        NGINX_PORT="$(free_port)"
        save_ports
    fi
    nginx_config
    "$bin" -p "$NGX_DIR" -c "$NGX_DIR/nginx.conf" -e "$NGX_DIR/logs/error.log" ||
        die "nginx did not start: $(tail -n 3 "$NGX_DIR/logs/error.log" 2>/dev/null)"
    for ((i = 0; i < 100; i++)); do
        if pid="$(nginx_pid)" && (($(children "$pid" | wc -l) >= 2)); then
            say "nginx started (master $pid, port $NGINX_PORT)"
            return 0
        fi
        sleep 0.1
    done
    die "nginx did not come up in 10 s: $(tail -n 3 "$NGX_DIR/logs/error.log" 2>/dev/null)"
}

# Stop the master (graceful, then SIGKILL) and whatever workers are left.
nginx_stop() {
    local pid kids k
    pid="$(nginx_pid)" || { rm -f "$NGX_DIR/nginx.pid"; return 0; }
    kids="$(children "$pid")"
    kill -QUIT "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$STOP_TIMEOUT"; then
        say "nginx master $pid still running after ${STOP_TIMEOUT} s: SIGKILL"
        kids="$kids $(children "$pid")"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    for k in $kids; do
        if [[ "$(cat "/proc/$k/comm" 2>/dev/null)" == nginx ]]; then
            kill -KILL "$k" 2>/dev/null || true
        fi
    done
    rm -f "$NGX_DIR/nginx.pid"
    say "nginx stopped"
}

# --------------------------------------------------------------------------
# PostgreSQL

as_pg() { runuser -u "$PG_USER" -- "$@"; }

pg_start() {
    local bindir pid
    bindir="$(pg_bindir)"
    [[ -n $bindir ]] || die "PostgreSQL not installed (scripts/setup.sh installs it)"
    id "$PG_USER" >/dev/null 2>&1 || die "no user $PG_USER (the PostgreSQL package makes it)"
    if pid="$(pg_pid)"; then
        say "postgres already running (postmaster $pid, port $PG_PORT)"
        return 0
    fi
    if [[ -z $PG_PORT ]] || ! port_free "$PG_PORT"; then
        PG_PORT="$(free_port)"
        save_ports
    fi
    mkdir -p "$PG_DIR"
    chmod 755 "$DIR"
    chown "$PG_USER:" "$PG_DIR"
    chmod 700 "$PG_DIR"
    local fresh=0
    if [[ ! -f $PG_DATA/PG_VERSION ]]; then
        rm -rf "$PG_DATA"
        as_pg "$bindir/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --no-sync \
            --locale=C >"$PG_DIR/initdb.log" 2>&1 ||
            die "initdb failed: $(tail -n 5 "$PG_DIR/initdb.log")"
        fresh=1
    fi
    as_pg mkdir -p "$PG_SOCKDIR"
    rm -f "$PG_DATA/postmaster.pid" # stale: pg_pid found no live postmaster
    # -w: wait until it accepts connections (at most 60 s)
    as_pg "$bindir/pg_ctl" -D "$PG_DATA" -l "$PG_DIR/postgres.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_SOCKDIR -c shared_buffers=64MB \
-c max_connections=30 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
        start >/dev/null || die "postgres did not start: $(tail -n 5 "$PG_DIR/postgres.log")"
    if ((fresh)) || [[ ! -f $PG_DIR/bench.ok ]]; then
        as_pg "$bindir/createdb" -h "$PG_SOCKDIR" -p "$PG_PORT" bench 2>/dev/null || true
        as_pg "$bindir/pgbench" -i -q -s 1 -h "$PG_SOCKDIR" -p "$PG_PORT" bench \
            >"$PG_DIR/pgbench-init.log" 2>&1 ||
            die "pgbench -i failed: $(tail -n 5 "$PG_DIR/pgbench-init.log")"
        touch "$PG_DIR/bench.ok"
    fi
    say "postgres started (postmaster $(pg_pid), port $PG_PORT, socket dir $PG_SOCKDIR)"
}

pg_stop() {
    local bindir pid kids k
    pid="$(pg_pid)" || return 0
    bindir="$(pg_bindir)"
    kids="$(children "$pid")"
    # fast: roll back open transactions, end every backend
    as_pg "$bindir/pg_ctl" -D "$PG_DATA" -m fast -w -t "$STOP_TIMEOUT" stop >/dev/null 2>&1 ||
        true
    # pg_ctl returns when the pid file is gone, just before the postmaster exits
    if ! wait_gone "$pid" 5; then
        say "postmaster $pid still running after ${STOP_TIMEOUT} s: SIGKILL"
        kids="$kids $(children "$pid")"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    for k in $kids; do
        if [[ "$(cat "/proc/$k/comm" 2>/dev/null)" == postgres ]]; then
            kill -KILL "$k" 2>/dev/null || true
        fi
    done
    wait_gone "$pid" 5 || say "postmaster $pid did not end"
    say "postgres stopped"
}

# --------------------------------------------------------------------------

status() {
    local npid ppid rc=0
    echo "MEMTRACE_SERVERS_DIR=$DIR"
    echo "NGINX_BIN=$(nginx_bin)"
    echo "NGINX_CONF=$NGX_DIR/nginx.conf"
    echo "NGINX_PREFIX=$NGX_DIR"
    echo "NGINX_PORT=$NGINX_PORT"
    npid="$(nginx_pid)" || { npid=""; rc=1; }
    echo "NGINX_PID=$npid"
    echo "PG_BINDIR=$(pg_bindir)"
    echo "PG_DATA=$PG_DATA"
    echo "PG_SOCKDIR=$PG_SOCKDIR"
    echo "PG_PORT=$PG_PORT"
    echo "PG_USER=$PG_USER"
    echo "PG_DATABASE=bench"
    ppid="$(pg_pid)" || { ppid=""; rc=1; }
    echo "PG_PID=$ppid"
    return $rc
}

if [[ $EUID -ne 0 ]]; then
    die "must run as root (it starts PostgreSQL as user $PG_USER)"
fi

cmd="${1:-}"
case "$cmd" in
    start)
        mkdir -p "$DIR"
        load_ports
        nginx_start
        pg_start
        status
        ;;
    stop)
        load_ports
        nginx_stop
        pg_stop
        ;;
    status)
        load_ports
        status
        ;;
    *)
        echo "usage: scripts/servers.sh start|stop|status" >&2
        exit 2
        ;;
esac
