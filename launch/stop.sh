#!/usr/bin/env bash
# Stop Ray nodes started by start_head.sh / join_worker.sh, by the pids they recorded.
#
# Never `ray stop`: it ends every Ray process on the machine, other users' clusters included.
# SIGTERM goes to the `ray start --block` process alone: it stops the processes it started in order
# (a SIGTERM to the whole group kills the GCS at once, and `ray start` then waits 30 s for it to mark
# the node as draining). Whatever is left of its process group after the timeout gets SIGKILL.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/stop.sh [--state-dir DIR] [--timeout S] [NAME|PIDFILE ...]

Stops the named nodes (head, worker-1, ... or paths to their .pid files); with none, every node
recorded in the state dir, workers first.

options:
  --state-dir DIR   where the .pid files are (default ${FTCLUSTER_RAY_DIR:-$HOME/.ftcluster/ray})
  --timeout S       seconds to wait after SIGTERM before SIGKILL (default 15)
  -h, --help        this help
EOF
}

timeout=15 state_dir="${FTCLUSTER_RAY_DIR:-$HOME/.ftcluster/ray}"
names=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --state-dir|--timeout)
      (($# >= 2)) || { echo "stop.sh: $1 needs a value" >&2; exit 2; }
      set -- "$1=$2" "${@:3}"; continue ;;
    --state-dir=*) state_dir="${1#*=}" ;;
    --timeout=*) timeout="${1#*=}" ;;
    -*) echo "stop.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) names+=("$1") ;;
  esac
  shift
done

pid_files=()
if ((${#names[@]})); then
  for name in "${names[@]}"; do
    if [[ $name == */* || $name == *.pid ]]; then pid_files+=("$name"); else pid_files+=("$state_dir/$name.pid"); fi
  done
else
  for pid_file in "$state_dir"/worker-*.pid "$state_dir/head.pid"; do
    [[ -f $pid_file ]] && pid_files+=("$pid_file")
  done
  ((${#pid_files[@]})) || { echo "stop.sh: no nodes recorded in $state_dir"; exit 0; }
fi

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

status=0
for pid_file in "${pid_files[@]}"; do
  name=$(basename "$pid_file" .pid)
  if [[ ! -f $pid_file ]]; then
    echo "stop.sh: $name: no pid file $pid_file" >&2; status=1; continue
  fi
  pid=$(cat "$pid_file")
  if [[ ! $pid =~ ^[0-9]+$ ]]; then
    echo "stop.sh: $name: $pid_file holds no pid; removing it" >&2; rm -f "$pid_file"; continue
  fi
  # A pid is reused once its process is gone: only signal it while it is still our `ray start`.
  if ! ps -o args= -p "$pid" 2>/dev/null | grep -q "ray.* start .*--block"; then
    # Linux hands out no pid still in use as a process group id, so a group without its leader is ours.
    if ! kill -0 "$pid" 2>/dev/null && group_alive "$pid"; then
      echo "stop.sh: $name: ray start (pid $pid) is gone but left processes behind; sending them SIGKILL" >&2
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    echo "$name: not running"; rm -f "$pid_file"; continue
  fi
  started=$SECONDS
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + timeout))
  while group_alive "$pid" && ((SECONDS < deadline)); do sleep 0.5; done
  if group_alive "$pid"; then
    echo "stop.sh: $name: still running ${timeout}s after SIGTERM; sending SIGKILL" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while group_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  fi
  if group_alive "$pid"; then
    echo "stop.sh: $name: process group $pid survived SIGKILL" >&2; status=1; continue
  fi
  rm -f "$pid_file"
  echo "$name: stopped (pid $pid, $((SECONDS - started))s)"
done
exit $status
