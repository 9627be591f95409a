#!/usr/bin/env bash
# A throwaway two-node Slurm cluster on this one machine, for trying and testing the job scripts.
#
#   slurm/local-cluster.sh up       install slurm-wlm + munge if missing, start munged, slurmctld and two
#                                   slurmd (node1, node2; own ports), all state under a fresh temp folder
#   slurm/local-cluster.sh env      print `export SLURM_CONF=...` for using sbatch/squeue against it
#   slurm/local-cluster.sh status   say whether it is up (exit 0) or not (exit 1)
#   slurm/local-cluster.sh down     stop exactly the daemons `up` started and delete its temp folder
#
# Must run as root (the daemons, and Debian's apt-get). Nothing is written outside the temp folder except
# the state file that records it ($CONTRASTIVE_SLURM_STATE, default /tmp/contrastive-local-slurm.env) and,
# if they are missing, the installed packages. A system Slurm or munge, if any, is left alone: ours use
# their own config, socket and ports.
set -euo pipefail

STATE_FILE=${CONTRASTIVE_SLURM_STATE:-/tmp/contrastive-local-slurm.env}
PORT_BASE=${CONTRASTIVE_SLURM_PORT_BASE:-16817}
NODE_CPUS=${CONTRASTIVE_SLURM_NODE_CPUS:-$(nproc)}
NODES=(node1 node2)
PARTITION=debug

log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

port_in_use() { (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port_after() {  # first free TCP port > $1
    local p=$(($1 + 1))
    while port_in_use "$p"; do p=$((p + 1)); done
    echo "$p"
}

pid_alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

read_pid() { [[ -s $1 ]] && tr -d '[:space:]' <"$1" || true; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "${missing[*]} missing and no apt-get to install them (Debian/Ubuntu only)"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2 || die "apt-get install ${missing[*]} failed"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local timeout=$1 what=$2
    shift 2
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

write_slurm_conf() {  # write_slurm_conf DIR CTLD_PORT NODE_PORT...
    local dir=$1 ctld_port=$2
    shift 2
    local host
    host=$(hostname -s)
    cat >"$dir/slurm.conf" <<EOF
# Written by slurm/local-cluster.sh: two nodes on one machine, no cgroups, no accounting database.
ClusterName=contrastive-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$dir/ctld
SlurmctldPidFile=$dir/ctld/slurmctld.pid
SlurmctldLogFile=$dir/ctld/slurmctld.log
SlurmdSpoolDir=$dir/%n/spool
SlurmdPidFile=$dir/%n/slurmd.pid
SlurmdLogFile=$dir/%n/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (default 60 s / 30 s), so a requeued job starts again promptly.
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting database to ask).
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
SlurmctldDebug=info
SlurmdDebug=info
EOF
    local node
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 Port=$1 CPUs=$NODE_CPUS RealMemory=1000" \
            "State=UNKNOWN" >>"$dir/slurm.conf"
        shift
    done
    local node_list
    node_list=$(IFS=,; echo "${NODES[*]}")
    echo "PartitionName=$PARTITION Nodes=$node_list Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" \
        >>"$dir/slurm.conf"
}

cluster_responds() {
    SLURM_CONF=$1 sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^(idle|alloc|mix)/ {n++} END {exit !(n == '${#NODES[@]}')}'
}

jobs_gone() { [[ -z $(SLURM_CONF=$1 squeue -h -t RUNNING,COMPLETING,PENDING -o %i 2>/dev/null) ]]; }

cmd_status() {
    [[ -f $STATE_FILE ]] || { log "down (no state file $STATE_FILE)"; return 1; }
    # shellcheck disable=SC1090
    source "$STATE_FILE"
    local pid
    for pid in "$MUNGED_PID" "$SLURMCTLD_PID" $SLURMD_PIDS; do
        pid_alive "$pid" || { log "down (daemon $pid from $STATE_FILE is gone)"; return 1; }
    done
    cluster_responds "$SLURM_CONF" || { log "daemons run but the nodes are not idle/allocated"; return 1; }
    log "up: SLURM_CONF=$SLURM_CONF partition=$PARTITION nodes=${NODES[*]}"
}

cmd_env() {
    [[ -f $STATE_FILE ]] || die "not up (no $STATE_FILE); run: $0 up"
    # shellcheck disable=SC1090
    source "$STATE_FILE"
    echo "export SLURM_CONF=$SLURM_CONF"
}

cmd_up() {
    [[ $(id -u) == 0 ]] || die "run as root (the Slurm and munge daemons need it)"
    if [[ -f $STATE_FILE ]]; then
        if cmd_status 2>/dev/null; then
            log "already up; $(cmd_env)"
            return 0
        fi
        log "stale state in $STATE_FILE; cleaning up first"
        cmd_down
    fi
    install_packages

    local dir
    dir=$(mktemp -d /tmp/contrastive-slurm.XXXXXX)
    chmod 755 "$dir"  # users other than root can read slurm.conf and submit
    mkdir -p "$dir/munge" "$dir/ctld"
    chmod 755 "$dir/munge"  # clients of any user reach the socket; the key inside stays root-only (0400)
    local node
    for node in "${NODES[@]}"; do mkdir -p "$dir/$node/spool"; done

    local ctld_port node_ports=() p
    ctld_port=$(free_port_after $((PORT_BASE - 1)))
    p=$ctld_port
    for node in "${NODES[@]}"; do
        p=$(free_port_after "$p")
        node_ports+=("$p")
    done
    write_slurm_conf "$dir" "$ctld_port" "${node_ports[@]}"
    # Record the folder before starting anything, so `down` can clean up after a half-done `up`.
    {
        echo "STATE_DIR=$dir"
        echo "SLURM_CONF=$dir/slurm.conf"
        echo "PARTITION=$PARTITION"
        echo "MUNGED_PID="
        echo "SLURMCTLD_PID="
        echo "SLURMD_PIDS=\"\""
    } >"$STATE_FILE"

    # munge: our own key, socket and pid file; --force because it runs as root.
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket.2" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" || { cmd_down; die "munged failed to start; see its log above"; }
    wait_for 10 munged test -s "$dir/munge/munged.pid" || { cmd_down; die "munged wrote no pid file"; }
    local munged_pid
    munged_pid=$(read_pid "$dir/munge/munged.pid")
    sed -i "s/^MUNGED_PID=.*/MUNGED_PID=$munged_pid/" "$STATE_FILE"

    export SLURM_CONF=$dir/slurm.conf
    # -i: ignore (there is none) saved state; daemons fork into the background and write pid files.
    slurmctld -i -f "$SLURM_CONF" || { cmd_down; die "slurmctld failed; see $dir/ctld/slurmctld.log"; }
    wait_for 15 slurmctld test -s "$dir/ctld/slurmctld.pid" || { cmd_down; die "slurmctld wrote no pid file"; }
    sed -i "s/^SLURMCTLD_PID=.*/SLURMCTLD_PID=$(read_pid "$dir/ctld/slurmctld.pid")/" "$STATE_FILE"

    local slurmd_pids=""
    for node in "${NODES[@]}"; do
        slurmd -N "$node" -f "$SLURM_CONF" || { cmd_down; die "slurmd -N $node failed; see $dir/$node/slurmd.log"; }
        wait_for 15 slurmd test -s "$dir/$node/slurmd.pid" || { cmd_down; die "slurmd -N $node wrote no pid file"; }
        slurmd_pids="$slurmd_pids $(read_pid "$dir/$node/slurmd.pid")"
        sed -i "s/^SLURMD_PIDS=.*/SLURMD_PIDS=\"${slurmd_pids# }\"/" "$STATE_FILE"
    done

    if ! wait_for 60 nodes cluster_responds "$SLURM_CONF"; then
        sinfo -N >&2 || true
        tail -n 20 "$dir/ctld/slurmctld.log" >&2 || true
        cmd_down
        die "the nodes did not come up within 60 s"
    fi
    log "up: partition $PARTITION with ${NODES[*]} ($NODE_CPUS CPUs each), state in $dir"
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop_pid() {  # stop_pid PID NAME: SIGTERM, then SIGKILL after 10 s
    local pid=$1 name=$2
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 10))
    while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if pid_alive "$pid"; then
        log "$name ($pid) ignored SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

cmd_down() {
    [[ -f $STATE_FILE ]] || { log "not up (no $STATE_FILE); nothing to stop"; return 0; }
    local STATE_DIR="" MUNGED_PID="" SLURMCTLD_PID="" SLURMD_PIDS=""
    # shellcheck disable=SC1090
    source "$STATE_FILE"
    # Jobs first (only this cluster's: the commands talk to our slurmctld), so no job step outlives its slurmd.
    if pid_alive "$SLURMCTLD_PID" && [[ -f $STATE_DIR/slurm.conf ]]; then
        local conf=$STATE_DIR/slurm.conf
        if [[ -n $(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null) ]]; then
            SLURM_CONF=$conf scancel --full --signal=KILL --state=RUNNING 2>/dev/null || true
            SLURM_CONF=$conf scancel --state=PENDING 2>/dev/null || true
            wait_for 30 jobs-gone jobs_gone "$conf" || log "jobs still listed after 30 s; stopping anyway"
        fi
    fi
    local pid
    for pid in $SLURMD_PIDS; do stop_pid "$pid" slurmd; done
    stop_pid "$SLURMCTLD_PID" slurmctld
    stop_pid "$MUNGED_PID" munged
    if [[ -n $STATE_DIR && $STATE_DIR == /tmp/contrastive-slurm.* && -d $STATE_DIR ]]; then
        rm -rf "$STATE_DIR"
    fi
    rm -f "$STATE_FILE"
    log "down"
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
