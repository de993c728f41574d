# Shared by up.sh and down.sh (sourced): where the local cluster keeps its state, and how a pid file
# is trusted.
STATE_DIR="${FTCLUSTER_SLURM_DIR:-/var/lib/ftcluster-slurm}"
NODES=(node1 node2)

# A pid file's pid, if that process is alive and is the expected program (never a recycled pid).
live_pid() {   # live_pid PIDFILE PROGRAM
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$2" || return 1
    echo "$pid"
}
