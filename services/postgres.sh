#!/usr/bin/env bash
# A real PostgreSQL server for ckptguard's MLflow tests (tests/mlflowkit.py) and for trying
# `ckptguard mlflow` by hand. Debian 12 (bookworm), as root, without systemd.
#
#   services/postgres.sh start      install (if missing), initialise (once) and start the server;
#                                   wait until it answers. Idempotent.
#   services/postgres.sh stop       stop the server this script started. Idempotent.
#   services/postgres.sh status     print the server's state and where its log is; exit 0 only
#                                   when it answers a query.
#   services/postgres.sh url DB     print the SQLAlchemy URL (postgresql+psycopg2://) of database
#                                   DB on this server (the database itself is not created).
#
# Environment:
#   CKPTGUARD_PG_DIR      the server's own directory: data/ (PGDATA), the Unix socket, the log
#                         (default /var/lib/ckptguard-pg)
#   CKPTGUARD_PG_PORT     TCP port on 127.0.0.1, also the socket's name (default 55432)
#   CKPTGUARD_PG_VERSION  Debian's PostgreSQL major version (default 15)
#   CKPTGUARD_PG_WAIT     seconds to wait for the server to start or stop (default 60)
#
# What it sets up:
#   * Debian's packages postgresql-$VERSION and postgresql-client-$VERSION, installed with apt-get
#     only when the binaries are missing. Debian's own cluster (pg_ctlcluster, port 5432) is
#     neither used nor started: this server has its own directory and port.
#   * A cluster in $CKPTGUARD_PG_DIR/data (initdb, UTF-8, superuser `postgres`), owned by and run
#     as the `postgres` OS user (PostgreSQL refuses to run as root).
#   * It listens on 127.0.0.1 only and on a socket in $CKPTGUARD_PG_DIR. Authentication is
#     `trust`, for the socket and the loopback addresses only (pg_hba.conf lists nothing else,
#     so no other host gets in even if listen_addresses were widened): a test server, never one
#     holding data anyone needs.
#   * The log: $CKPTGUARD_PG_DIR/postgres.log.
set -euo pipefail

DIR=${CKPTGUARD_PG_DIR:-/var/lib/ckptguard-pg}
PORT=${CKPTGUARD_PG_PORT:-55432}
VERSION=${CKPTGUARD_PG_VERSION:-15}
WAIT=${CKPTGUARD_PG_WAIT:-60}
PGBIN=/usr/lib/postgresql/$VERSION/bin
DATA=$DIR/data
LOG=$DIR/postgres.log
RUNAS=postgres

log() { printf 'postgres.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (installs packages, runs the server as $RUNAS)"
}

lock() { # one start or stop at a time (two test sessions, two CI steps)
    mkdir -p "$DIR"
    # fd 9 must not reach the server (it would hold the lock for ever): each start closes it.
    exec 9>"$DIR/.lock"
    flock -w 300 9 || die "another postgres.sh holds $DIR/.lock"
}

as_pg() { runuser -u "$RUNAS" -- "$@"; }

# ---- packages -------------------------------------------------------------------------------
install_packages() {
    [ -x "$PGBIN/initdb" ] && [ -x "$PGBIN/pg_ctl" ] && command -v psql >/dev/null && return 0
    command -v apt-get >/dev/null || die "missing $PGBIN/initdb and no apt-get (Debian 12 only)"
    local pkgs=("postgresql-$VERSION" "postgresql-client-$VERSION")
    log "installing ${pkgs[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # The package's postinst starts Debian's own cluster with invoke-rc.d; this script starts its
    # own server, so keep the package from doing it (exit 101 = "action forbidden by policy"),
    # unless the machine already has a policy of its own (Docker images ship one).
    local policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# ckptguard postgres.sh: installing PostgreSQL\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        # shellcheck disable=SC2064 # expand now: $policy is local
        trap "rm -f '$policy'" EXIT
    fi
    apt-get update -q >"$DIR/apt.log" 2>&1 || {
        tail -n 20 "$DIR/apt.log" >&2
        die "apt-get update failed (log: $DIR/apt.log)"
    }
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$DIR/apt.log" 2>&1 9>&- || {
        tail -n 20 "$DIR/apt.log" >&2
        die "apt-get install ${pkgs[*]} failed (log: $DIR/apt.log)"
    }
    if [ -n "$(trap -p EXIT)" ]; then
        rm -f "$policy"
        trap - EXIT
    fi
    [ -x "$PGBIN/initdb" ] || die "installed ${pkgs[*]} but $PGBIN/initdb is still missing"
}

# ---- the cluster ----------------------------------------------------------------------------
init_cluster() {
    id "$RUNAS" >/dev/null 2>&1 || die "no OS user $RUNAS (the postgresql package creates it)"
    chown "$RUNAS:$RUNAS" "$DIR"
    chmod 0755 "$DIR" # root and the tests reach the socket; PGDATA itself stays 0700
    [ -f "$DATA/PG_VERSION" ] && return 0
    log "initialising a cluster in $DATA"
    rm -rf "$DATA" # a half-made directory of an interrupted initdb
    install -d -o "$RUNAS" -g "$RUNAS" -m 0700 "$DATA"
    as_pg "$PGBIN/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=trust >"$DIR/initdb.log" 2>&1 || {
        tail -n 20 "$DIR/initdb.log" >&2
        die "initdb failed (log: $DIR/initdb.log)"
    }
    printf "\ninclude_if_exists = 'ckptguard.conf'\n" >>"$DATA/postgresql.conf"
}

write_conf() { # the settings this script owns, rewritten at every start (the port may change)
    cat >"$DATA/ckptguard.conf" <<EOF
# Written by ckptguard services/postgres.sh at each start; edits are lost.
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
logging_collector = off
EOF
    cat >"$DATA/pg_hba.conf" <<EOF
# Written by ckptguard services/postgres.sh: trust, and only for local connections.
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    all       all   127.0.0.1/32   trust
host    all       all   ::1/128        trust
EOF
    chown "$RUNAS:$RUNAS" "$DATA/ckptguard.conf" "$DATA/pg_hba.conf"
}

answers() { # a query over TCP, as the tests connect
    psql -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -X -A -t -q -c 'select 1' \
        >/dev/null 2>&1
}

running() { as_pg "$PGBIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

show_log() {
    [ -s "$LOG" ] || return 0
    printf -- '---- last lines of %s ----\n' "$LOG" >&2
    tail -n 25 "$LOG" >&2
}

# ---- commands -------------------------------------------------------------------------------
cmd_start() {
    need_root
    lock
    install_packages
    init_cluster
    if running; then
        answers && {
            log "already running on 127.0.0.1:$PORT (log: $LOG)"
            return 0
        }
        log "running but not answering on 127.0.0.1:$PORT; restarting"
        as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w -t "$WAIT" stop >/dev/null 2>&1 9>&- || true
    fi
    write_conf
    touch "$LOG" && chown "$RUNAS:$RUNAS" "$LOG"
    log "starting PostgreSQL $VERSION on 127.0.0.1:$PORT"
    # pg_ctl detaches the server (setsid) and waits (-w) until it accepts connections.
    as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t "$WAIT" start >/dev/null 2>&1 9>&- || {
        show_log
        die "the server did not start in ${WAIT}s (log: $LOG)"
    }
    answers || {
        show_log
        die "the server started but does not answer on 127.0.0.1:$PORT (log: $LOG)"
    }
    log "answering on 127.0.0.1:$PORT and $DIR/.s.PGSQL.$PORT (log: $LOG)"
}

cmd_stop() {
    need_root
    lock
    if [ -f "$DATA/PG_VERSION" ] && running; then
        log "stopping the server of $DATA"
        as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w -t "$WAIT" stop >/dev/null 2>&1 || {
            show_log
            die "the server did not stop in ${WAIT}s (log: $LOG)"
        }
    fi
    log "stopped; data and log stay in $DIR"
}

cmd_status() {
    local rc=0
    if [ -f "$DATA/PG_VERSION" ] && running; then
        echo "server: running ($DATA)"
    else
        echo "server: not running ($DATA)"
        rc=1
    fi
    if answers; then echo "127.0.0.1:$PORT: answering"; else
        echo "127.0.0.1:$PORT: not answering"
        rc=1
    fi
    echo "log: $LOG"
    return "$rc"
}

cmd_url() {
    local db=${1:-}
    [[ "$db" =~ ^[A-Za-z_][A-Za-z0-9_]{0,62}$ ]] ||
        die "url needs a database name of letters, digits and _ (got '${db}')"
    # The driver named: SQLAlchemy 2.1 takes a bare postgresql:// for psycopg 3, and the
    # mlflow extra installs psycopg2.
    echo "postgresql+psycopg2://postgres@127.0.0.1:$PORT/$db"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
url) cmd_url "${2:-}" ;;
*)
    echo "usage: $0 start|stop|status|url DB" >&2
    exit 2
    ;;
esac
