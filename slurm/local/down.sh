#!/usr/bin/env bash
# Stops the local SLURM cluster that slurm/local/up.sh started: cancels all jobs first (so no job
# processes linger), then stops slurmd node1/node2 and slurmctld by the pids in up.sh's pid files
# (SIGTERM, up to ~10 s, then SIGKILL). Never kills anything by name. Idempotent: exits 0 when
# nothing is running. Packages, /etc/slurm/slurm.conf and the state dir stay (up.sh reuses them).
#
#   sudo slurm/local/down.sh          # FTCLUSTER_SLURM_DIR must match the one up.sh used
set -euo pipefail

# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"
RUN="$STATE_DIR/run"
KEEP_JOBS=0

die() { echo "down.sh: error: $*" >&2; exit 1; }
log() { echo "down.sh: $*"; }

case "${1:-}" in
    "") ;;
    --keep-jobs) KEEP_JOBS=1 ;;
    -h|--help) echo "usage: $0 [--keep-jobs]   (stops the daemons started by up.sh; state dir $STATE_DIR)"; exit 0 ;;
    *) die "unknown argument: $1" ;;
esac
[ "$(id -u)" -eq 0 ] || die "must run as root (the daemons run as root)"

stop_pidfile() {   # stop_pidfile PIDFILE PROGRAM
    local pid
    if pid=$(live_pid "$1" "$2"); then
        log "stopping $2 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do   # 50 x 0.2 s = 10 s
            [ -d "/proc/$pid" ] || break
            # a zombie counts as gone
            [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" = Z ] && break
            sleep 0.2
        done
        if [ -d "/proc/$pid" ] && [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
            log "$2 (pid $pid) still alive after 10 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$1"
}

ctld=$(live_pid "$RUN/slurmctld.pid" slurmctld || true)
any=$ctld
for n in "${NODES[@]}"; do any+=$(live_pid "$RUN/slurmd-$n.pid" slurmd || true); done
if [ -z "$any" ]; then
    log "nothing running (no live pids in $RUN)"
    rm -f "$RUN"/slurmctld.pid "$RUN"/slurmd-*.pid
    exit 0
fi

# Cancel jobs while the controller and the slurmds still run, so that their processes are killed
# by Slurm itself (KillWait=5), then wait (up to ~15 s) for the queue to drain.
if [ -n "$ctld" ] && [ "$KEEP_JOBS" = 0 ] && command -v scancel >/dev/null; then
    mapfile -t jobs < <(squeue -h -o '%i' 2>/dev/null || true)
    if [ ${#jobs[@]} -gt 0 ]; then
        log "cancelling all jobs: ${jobs[*]}"
        scancel --quiet "${jobs[@]}" 2>/dev/null || true
        for _ in $(seq 1 75); do   # 75 x 0.2 s = 15 s
            [ -z "$(squeue -h -t RUNNING,COMPLETING,CONFIGURING,SUSPENDED -o '%i' 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

for n in "${NODES[@]}"; do stop_pidfile "$RUN/slurmd-$n.pid" slurmd; done
stop_pidfile "$RUN/slurmctld.pid" slurmctld
log "stopped"
