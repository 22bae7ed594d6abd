#!/usr/bin/env bash
# A real single-node Slurm cluster for ckptguard's tests (tests/test_slurm.py) and for trying
# the sbatch template by hand. Debian 12 (bookworm), as root, without systemd.
#
#   slurm/local-cluster.sh start    install (if missing) and start munged, slurmctld, slurmd;
#                                   wait until the node is idle. Idempotent.
#   slurm/local-cluster.sh stop     stop the daemons this script started. Idempotent.
#   slurm/local-cluster.sh status   print the daemons, the node state and where the logs are;
#                                   exit 0 only when the node answers (idle, mixed or allocated).
#
# Environment:
#   CKPTGUARD_SLURM_DIR   state, spool, logs, pid files, slurm.conf (default /var/lib/ckptguard-slurm)
#   CKPTGUARD_SLURM_CPUS  CPUs to declare for the node, at least the real count (default 8)
#   CKPTGUARD_SLURM_WAIT  seconds to wait for the node to turn idle (default 60)
#
# What it sets up:
#   * Debian's packages slurmctld, slurmd, slurm-client and munge, installed with apt-get only
#     when missing (DEBIAN_FRONTEND=noninteractive).
#   * munged on the default socket (/run/munge/munge.socket.2), key /etc/munge/munge.key (made
#     with mungekey if missing). A munged that already answers there is reused, not restarted.
#   * $CKPTGUARD_SLURM_DIR/slurm.conf, linked from /etc/slurm/slurm.conf so that every client
#     (srun, sbatch, sinfo, ...) finds it without SLURM_CONF. An /etc/slurm/slurm.conf that this
#     script did not write is never replaced: start fails and says so.
#   * One node named after `hostname -s` (NodeAddr 127.0.0.1) in one default partition "debug",
#     with the real memory (`slurmd -C`) and CPUs=max(real, CKPTGUARD_SLURM_CPUS).
#
# Oversubscription: the node declares at least 8 CPUs (SlurmdParameters=config_overrides lets
# slurmd accept more CPUs than the hardware has), so `srun -n 4` and two 4-task jobs at once run
# on a 2-core machine with unchanged command lines. The alternatives were rejected: srun
# --overcommit works only if every command line (tests, train.sbatch, `ckptguard run`)
# carries a flag that is wrong on a real cluster, and OverSubscribe=FORCE on the partition lets
# several *jobs* share a CPU but never gives one job more tasks than CPUs. TaskPlugin=task/none
# binds nothing, so the extra CPUs are only scheduler bookkeeping. Memory is not a consumable
# resource (CR_Core), so jobs need no --mem.
#
# MPI over srun (MpiDefault=pmi2): the MPICH wheel from PyPI (`pip install mpich mpi4py`)
# carries MPICH's own PMI client, and Slurm's mpi/pmi2 plugin serves it over PMI_FD, so
#
#   srun -n 4 .venv/bin/python -c "from mpi4py import MPI; c=MPI.COMM_WORLD; \
#       print(c.Get_rank(), c.Get_size(), c.allreduce(1))"
#
# prints four distinct ranks 0..3 of size 4 and allreduce 4, with no mpiexec, no PMI_LIBRARY
# and no --mpi flag (pmi2 is the default here; `--mpi=pmi2` says it explicitly on other
# clusters). A process between srun and the MPI program (e.g. `ckptguard run`) must leave the
# PMI_FD descriptor open for its child (Python: Popen(..., pass_fds=(int(os.environ["PMI_FD"]),))),
# or MPI_Init fails with "PMI_Init returned -1". Also working: `salloc -n 4 mpiexec -n 4 ...`.
# Not working: MPIR_CVAR_PMI_VERSION=2 (MPICH's PMI-2 wire client), --mpi=pmix (needs
# libpmix-dev; hung in slurmstepd here). slurm/README.md has the details.
set -euo pipefail

DIR=${CKPTGUARD_SLURM_DIR:-/var/lib/ckptguard-slurm}
MIN_CPUS=${CKPTGUARD_SLURM_CPUS:-8}
WAIT=${CKPTGUARD_SLURM_WAIT:-60}
ETC_CONF=/etc/slurm/slurm.conf
CONF=$DIR/slurm.conf
LOGDIR=$DIR/log
RUNDIR=$DIR/run
MARKER="# Written by ckptguard slurm/local-cluster.sh"
NODE=$(hostname -s)
PARTITION=debug

log() { printf 'local-cluster: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (installs packages, starts daemons)"
}

lock() { # one start or stop at a time (parallel make, two CI steps)
    mkdir -p "$DIR"
    # fd 9 must not reach the daemons (they would hold the lock for ever): each start closes it.
    exec 9>"$DIR/.lock"
    flock -w 300 9 || die "another local-cluster.sh holds $DIR/.lock"
}

# ---- packages -------------------------------------------------------------------------------
install_packages() {
    local missing=() pkg
    for pkg in munge slurmctld slurmd slurm-client; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get (Debian 12 only)"
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' postinst scripts start their daemons with invoke-rc.d; this script starts
    # them itself, so keep the packages from doing it (exit 101 = "action forbidden by policy"),
    # unless the machine already has a policy of its own (Docker images ship one).
    local policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# ckptguard local-cluster.sh: installing Slurm\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        # shellcheck disable=SC2064 # expand now: $policy is local
        trap "rm -f '$policy'" EXIT
    fi
    apt-get update -q >"$LOGDIR/apt.log" 2>&1 || {
        tail -n 20 "$LOGDIR/apt.log" >&2
        die "apt-get update failed (log: $LOGDIR/apt.log)"
    }
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOGDIR/apt.log" 2>&1 9>&- || {
        tail -n 20 "$LOGDIR/apt.log" >&2
        die "apt-get install ${missing[*]} failed (log: $LOGDIR/apt.log)"
    }
    if [ -n "$(trap -p EXIT)" ]; then
        rm -f "$policy"
        trap - EXIT
    fi
}

# ---- munge ----------------------------------------------------------------------------------
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        [ -f "$RUNDIR/munged.ours" ] ||
            log "munged already answers on the default socket; reusing it"
        return 0
    fi
    log "starting munged"
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    # A stale socket or pid file from a killed munged makes the new one refuse to start.
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged --force </dev/null >>"$LOGDIR/munged.out" 2>&1 9>&- ||
        {
            tail -n 20 /var/log/munge/munged.log "$LOGDIR/munged.out" >&2 2>/dev/null || true
            die "munged did not start (logs: /var/log/munge/munged.log, $LOGDIR/munged.out)"
        }
    touch "$RUNDIR/munged.ours"
    local _
    for _ in $(seq 50); do
        munge_ok && return 0
        sleep 0.1
    done
    die "munged started but munge -n | unmunge fails (log: /var/log/munge/munged.log)"
}

# ---- slurm.conf -----------------------------------------------------------------------------
hw_value() { # hw_value KEY: a value from `slurmd -C`, e.g. CPUs or RealMemory
    slurmd -C 2>/dev/null | tr ' ' '\n' | sed -n "s/^$1=//p" | head -n 1
}

write_conf() { # write_conf FILE
    local cpus mem
    cpus=$(hw_value CPUs)
    mem=$(hw_value RealMemory)
    [ -n "$cpus" ] || cpus=$(nproc)
    [ -n "$mem" ] || mem=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
    [ "$cpus" -ge "$MIN_CPUS" ] || cpus=$MIN_CPUS
    cat >"$1" <<EOF
$MARKER (real node: $(hw_value CPUs) CPUs).
# Regenerated by 'start'; edit the script, not this file.
ClusterName=ckptguard
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only cred_expire seconds after it was requeued (default 120):
# sooner, slurmd still holds the revoked credential of the job's previous run and kills the new
# one ("Job credential revoked"). 20 s keeps the requeue cycle in tests short; a step must still
# launch within 20 s of its credential being issued, which a single node does in well under 1 s.
AuthInfo=cred_expire=20
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
SchedulerType=sched/backfill
# Schedule a batch job at once rather than up to 3 s later, and look for startable jobs every
# 2 s (default 30 s): a requeued job is started soon after its cred_expire wait ends.
SchedulerParameters=batch_sched_delay=0,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=pmi2
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
InactiveLimit=0
# sbatch --wait polls every 2 s only while MinJobAge < 8 s; at 300 it waits 2, 8, then 32 s.
MinJobAge=5
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

link_conf() {
    if [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
        if [ "$(readlink -f "$ETC_CONF")" = "$(readlink -f "$CONF")" ]; then
            return 0
        fi
        if ! head -n 1 "$ETC_CONF" 2>/dev/null | grep -qF "$MARKER"; then
            die "$ETC_CONF exists and was not written by this script; not replacing it" \
                "(move it away to use the local test cluster)"
        fi
    fi
    mkdir -p "$(dirname "$ETC_CONF")"
    ln -sfn "$CONF" "$ETC_CONF"
}

# ---- daemons --------------------------------------------------------------------------------
pid_alive() { # pid_alive NAME: the daemon's pid file names a live process of that name
    local pid
    pid=$(cat "$RUNDIR/$1.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

stop_daemon() { # stop_daemon NAME
    local pid _
    pid_alive "$1" || {
        rm -f "$RUNDIR/$1.pid"
        return 0
    }
    pid=$(cat "$RUNDIR/$1.pid")
    log "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$1 ignored SIGTERM for 10 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$RUNDIR/$1.pid"
}

start_daemon() { # start_daemon NAME ARGS...: the daemon forks into the background itself
    local name=$1
    shift
    pid_alive "$name" && return 0
    log "starting $name"
    setsid "/usr/sbin/$name" "$@" </dev/null >>"$LOGDIR/$name.out" 2>&1 9>&- || {
        show_logs "$name"
        die "$name exited at start (log: $LOGDIR/$name.log)"
    }
}

node_state() { sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -n 1 || true; }

show_logs() {
    local d f
    for d in "$@"; do
        for f in "$LOGDIR/$d.log" "$LOGDIR/$d.out"; do
            [ -s "$f" ] || continue
            printf -- '---- last lines of %s ----\n' "$f" >&2
            tail -n 25 "$f" >&2
        done
    done
}

wait_idle() {
    local deadline=$((SECONDS + WAIT)) state="" resumed=0
    while [ "$SECONDS" -lt "$deadline" ]; do
        state=$(node_state)
        case "$state" in
        idle* | mix* | alloc* | comp*) return 0 ;;
        down* | drain* | drng* | fail*)
            # Left down or drained by an earlier run (e.g. a killed slurmd): give it back.
            if [ "$resumed" = 0 ] && pid_alive slurmd; then
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi
            ;;
        esac
        pid_alive slurmctld || {
            show_logs slurmctld
            die "slurmctld died (log: $LOGDIR/slurmctld.log)"
        }
        pid_alive slurmd || {
            show_logs slurmd
            die "slurmd died (log: $LOGDIR/slurmd.log)"
        }
        sleep 0.5
    done
    show_logs slurmctld slurmd
    sinfo -N -l >&2 2>/dev/null || true
    die "node $NODE not idle after ${WAIT}s (state: '${state:-no answer}');" \
        "logs: $LOGDIR/slurmctld.log $LOGDIR/slurmd.log"
}

print_where() {
    log "config: $CONF (linked from $ETC_CONF)"
    log "logs:   $LOGDIR/slurmctld.log $LOGDIR/slurmd.log /var/log/munge/munged.log"
}

# ---- commands -------------------------------------------------------------------------------
cmd_start() {
    need_root
    lock
    mkdir -p "$DIR" "$LOGDIR" "$RUNDIR" "$DIR/state" "$DIR/spool/slurmd"
    install_packages
    start_munge

    local new=$RUNDIR/slurm.conf.new
    write_conf "$new"
    if [ -f "$CONF" ] && cmp -s "$new" "$CONF"; then
        rm -f "$new"
    else
        if pid_alive slurmctld || pid_alive slurmd; then
            log "slurm.conf changed; restarting the slurm daemons"
            stop_daemon slurmd
            stop_daemon slurmctld
        fi
        mv "$new" "$CONF"
    fi
    link_conf

    start_daemon slurmctld -f "$CONF"
    start_daemon slurmd -f "$CONF" -N "$NODE"
    wait_idle
    log "node $NODE is $(node_state): $(sinfo -h -N -n "$NODE" -o '%c CPUs, %m MB, partition %P')"
    print_where
}

cmd_stop() {
    need_root
    lock
    stop_daemon slurmd
    stop_daemon slurmctld
    if [ -f "$RUNDIR/munged.ours" ]; then
        local pid
        pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
        if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = munged ]; then
            log "stopping munged (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
        fi
        rm -f "$RUNDIR/munged.ours"
    fi
    log "stopped; logs stay in $LOGDIR"
}

cmd_status() {
    local rc=0 d state
    for d in slurmctld slurmd; do
        if pid_alive "$d"; then
            echo "$d: running (pid $(cat "$RUNDIR/$d.pid"))"
        else
            echo "$d: not running"
            rc=1
        fi
    done
    if munge_ok; then echo "munged: answering"; else
        echo "munged: not answering"
        rc=1
    fi
    state=$(node_state)
    echo "node $NODE: ${state:-no answer}"
    case "$state" in idle* | mix* | alloc* | comp*) ;; *) rc=1 ;; esac
    echo "config: $CONF"
    echo "logs:   $LOGDIR/slurmctld.log $LOGDIR/slurmd.log /var/log/munge/munged.log"
    return "$rc"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
