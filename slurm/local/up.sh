#!/usr/bin/env bash
# Brings up a real SLURM cluster on this one machine: slurmctld plus two slurmd daemons that emulate
# the nodes node1 and node2 (both on 127.0.0.1), partition `debug`. Debian/Ubuntu, root only, for
# throwaway machines, laptops and CI: it uses AuthType=auth/none (no munge, no security at all).
#
#   sudo slurm/local/up.sh            # install (if needed), configure, start, wait until both nodes idle
#   sudo slurm/local/down.sh          # stop what up.sh started
#
# Idempotent: packages are installed only when missing, /etc/slurm/slurm.conf is (re)written only if
# it carries this script's marker line, and a cluster that is already up is left alone.
# State (spool dirs, logs, pid files) lives under $FTCLUSTER_SLURM_DIR (default /var/lib/ftcluster-slurm).
set -euo pipefail

MARKER="# written by ftcluster slurm/local/up.sh"
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
declare -A NODE_PORT=([node1]=17001 [node2]=17002)
PACKAGES=(slurmctld slurmd slurm-client)
READY_TIMEOUT_S="${FTCLUSTER_SLURM_READY_TIMEOUT_S:-60}"
ACCOUNTING=0
declare -A STARTED_AT=()   # node -> epoch second its slurmd was started by this run

die() { echo "up.sh: error: $*" >&2; exit 1; }
log() { echo "up.sh: $*"; }

usage() {
    cat <<EOF
usage: $0 [--help]

Brings up slurmctld + slurmd node1/node2 on this machine (root only, throwaway machines).
Environment: FTCLUSTER_SLURM_DIR (state dir, default /var/lib/ftcluster-slurm),
             FTCLUSTER_SLURM_READY_TIMEOUT_S (default 60).
Tear down with: $(dirname "$0")/down.sh
EOF
}

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            -h|--help) usage; exit 0 ;;
            --accounting) ACCOUNTING=1 ;;   # reserved: slurmdbd + MariaDB, see accounting_* below
            *) usage >&2; die "unknown argument: $1" ;;
        esac
        shift
    done
    if [ "$ACCOUNTING" = 1 ]; then
        die "--accounting is not implemented yet (it would add slurmdbd + mariadb-server)"
    fi
}

# --------------------------------------------------------------------------------------------- checks
check_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and writes /etc/slurm, /etc/hosts); try: sudo $0"
}

pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || echo "$p"; done
}

# ------------------------------------------------------------------------------------------- packages
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_BACKUP=""
restore_policy_rc() {
    if [ -n "$POLICY_RC_BACKUP" ]; then
        mv -f "$POLICY_RC_BACKUP" "$POLICY_RC"
    else
        rm -f "$POLICY_RC"
    fi
}

install_packages() {
    local missing
    if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
        # Without apt we can still go on if the daemons are already there (installed some other way).
        if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null; then
            return 0
        fi
        die "apt-get/dpkg not found: this script needs a Debian/Ubuntu machine (packages ${PACKAGES[*]})"
    fi
    missing=$(missing_packages | tr '\n' ' ')
    [ -z "${missing// /}" ] && return 0
    log "installing: $missing"
    # A policy-rc.d that returns 101 keeps the packages' postinst from starting any service; put back
    # whatever was there before (Docker images ship one).
    if [ -e "$POLICY_RC" ]; then
        POLICY_RC_BACKUP=$(mktemp "$POLICY_RC.ftcluster.XXXXXX")
        cp -p "$POLICY_RC" "$POLICY_RC_BACKUP"
    fi
    trap restore_policy_rc EXIT
    printf '#!/bin/sh\n# temporary, from ftcluster slurm/local/up.sh\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing; then
        log "apt-get install failed; running apt-get update and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get update -q || die "apt-get update failed"
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing \
            || die "apt-get install $missing failed"
    fi
    restore_policy_rc
    trap - EXIT
    missing=$(missing_packages | tr '\n' ' ')
    [ -z "${missing// /}" ] || die "packages still missing after install: $missing"
}

# ------------------------------------------------------------------------------------------- config
mem_mb() {
    # 90% of MemTotal, in MB; each emulated node claims it (slurmd checks its node against the host).
    awk '/^MemTotal:/ { printf "%d\n", $2 / 1024 * 0.9 }' /proc/meminfo
}

render_conf() {
    local cpus mem n
    cpus=$(nproc)
    mem=$(mem_mb)
    cat <<EOF
$MARKER
# state dir: $STATE_DIR
# Do not edit: up.sh rewrites this file. Remove the marker line above to keep your own changes
# (up.sh will then refuse to touch it).
ClusterName=ftcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job stays PENDING (Reason=BeginTime) for cred_expire+1 s (default 120) before it can
# run again, and then waits for the next periodic scheduler pass (sched_interval, default 60 s):
# short values keep requeue tests fast. cred_expire needs a daemon restart, not just reconfigure.
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmctldPort=6817
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd/%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
EnforcePartLimits=ALL
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
EOF
    accounting_conf
    for n in "${NODES[@]}"; do
        echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=${NODE_PORT[$n]} CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
}

accounting_conf() {
    # Hook for a future --accounting: AccountingStorageType=accounting_storage/slurmdbd,
    # JobAcctGatherType=jobacct_gather/linux, ... (plus slurmdbd.conf and MariaDB).
    echo "AccountingStorageType=accounting_storage/none"
}

CONF_CHANGED=0
write_conf() {
    local new
    mkdir -p "$CONF_DIR"
    new=$(render_conf)
    if [ -e "$CONF" ]; then
        if ! grep -qxF "$MARKER" "$CONF"; then
            die "$CONF exists and was not written by this script (no line '$MARKER'); refusing to overwrite it. Move it away to use the local cluster."
        fi
        if [ "$new" = "$(cat "$CONF")" ]; then
            return 0
        fi
    fi
    printf '%s\n' "$new" >"$CONF.ftcluster.tmp"
    chmod 644 "$CONF.ftcluster.tmp"
    mv -f "$CONF.ftcluster.tmp" "$CONF"
    CONF_CHANGED=1
    log "wrote $CONF"
}

ensure_hosts() {
    local n missing=()
    for n in "${NODES[@]}"; do
        # a non-comment line of /etc/hosts that names the node
        grep -Eq "^[^#]*[[:space:]]$n([[:space:]]|\$)" /etc/hosts || missing+=("$n")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "127.0.0.1 ${missing[*]}" >>/etc/hosts
        log "added '127.0.0.1 ${missing[*]}' to /etc/hosts"
    fi
}

ensure_dirs() {
    local n
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/run" "$STATE_DIR/log"
    for n in "${NODES[@]}"; do mkdir -p "$STATE_DIR/slurmd/$n"; done
    chmod 755 "$STATE_DIR"
}

# ------------------------------------------------------------------------------------------ daemons
ctld_pidfile() { echo "$STATE_DIR/run/slurmctld.pid"; }
slurmd_pidfile() { echo "$STATE_DIR/run/slurmd-$1.pid"; }

nodes_ready() {
    # Both nodes responding and usable: idle (or running jobs: mix/alloc), no */~/#/! suffix.
    # After a restart slurmctld recovers the nodes' last state (idle) from its state files before the
    # slurmds register, so a node whose slurmd we just started must also show a SlurmdStartTime no
    # older than that start (STARTED_AT, epoch seconds; 0 = no such check).
    local out n st since
    out=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    for n in "${NODES[@]}"; do
        st=$(awk -v n="$n" '$1 == n { print $2; exit }' <<<"$out")
        case "$st" in idle|mix|alloc) ;; *) return 1 ;; esac
        if [ "${STARTED_AT[$n]:-0}" != 0 ]; then
            since=$(scontrol show node "$n" 2>/dev/null | grep -oE 'SlurmdStartTime=[^ ]+' | cut -d= -f2)
            [ -n "$since" ] && [ "$since" != None ] || return 1
            [ "$(date -d "$since" +%s 2>/dev/null || echo 0)" -ge "${STARTED_AT[$n]}" ] || return 1
        fi
    done
}

all_up() {
    local n
    live_pid "$(ctld_pidfile)" slurmctld >/dev/null || return 1
    for n in "${NODES[@]}"; do live_pid "$(slurmd_pidfile "$n")" "slurmd" >/dev/null || return 1; done
    nodes_ready
}

any_up() {
    local n
    live_pid "$(ctld_pidfile)" slurmctld >/dev/null && return 0
    for n in "${NODES[@]}"; do live_pid "$(slurmd_pidfile "$n")" "slurmd" >/dev/null && return 0; done
    return 1
}

port_in_use() {   # port_in_use PORT: someone listens on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start_daemons() {
    local n
    if ! live_pid "$(ctld_pidfile)" slurmctld >/dev/null; then
        port_in_use 6817 && die "port 6817 is taken by a slurmctld (or something else) that this script did not start (pid files in $STATE_DIR/run); stop it first"
        log "starting slurmctld"
        slurmctld || die "slurmctld failed to start; see $STATE_DIR/log/slurmctld.log"
    fi
    for n in "${NODES[@]}"; do
        if ! live_pid "$(slurmd_pidfile "$n")" slurmd >/dev/null; then
            port_in_use "${NODE_PORT[$n]}" && die "port ${NODE_PORT[$n]} ($n) is taken by a process this script did not start; stop it first"
            log "starting slurmd -N $n"
            STARTED_AT[$n]=$(date +%s)
            slurmd -N "$n" || die "slurmd -N $n failed to start; see $STATE_DIR/log/slurmd-$n.log"
        fi
    done
}

wait_ready() {
    local deadline f
    deadline=$(( $(date +%s%N) / 1000000 + READY_TIMEOUT_S * 1000 ))
    until nodes_ready; do
        if [ $(( $(date +%s%N) / 1000000 )) -ge "$deadline" ]; then
            echo "up.sh: error: nodes not idle after ${READY_TIMEOUT_S}s" >&2
            sinfo -N -l >&2 2>&1 || true
            for f in "$STATE_DIR"/log/slurmctld.log "$STATE_DIR"/log/slurmd-*.log; do
                [ -e "$f" ] || continue
                echo "----- tail $f" >&2
                tail -n 20 "$f" >&2
            done
            exit 1
        fi
        sleep 0.5
    done
}

print_usage_info() {
    local here
    here=$(cd "$(dirname "$0")" && pwd)
    echo
    sinfo
    cat <<EOF

SLURM is up: slurmctld + slurmd node1/node2 (partition debug, $(nproc) CPUs each, auth/none).
  sbatch / srun / squeue / scontrol work now, e.g.  srun -N2 hostname
  ftcluster train launcher=slurm ...                 submits to this cluster
  config: $CONF   state and logs: $STATE_DIR
Tear down:  $here/down.sh
EOF
}

main() {
    parse_args "$@"
    check_root
    local t0
    t0=$(date +%s.%N)
    install_packages
    ensure_dirs
    write_conf
    ensure_hosts
    if [ "$CONF_CHANGED" = 0 ] && all_up; then
        log "cluster already up (slurmctld and both slurmd running, nodes respond)"
        sinfo
        exit 0
    fi
    if [ "$CONF_CHANGED" = 1 ] && any_up; then
        die "$CONF changed while daemons from $STATE_DIR are running; run $(dirname "$0")/down.sh, then this script again"
    fi
    start_daemons
    wait_ready
    log "ready in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
    print_usage_info
}

main "$@"
