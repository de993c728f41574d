#!/usr/bin/env bash
# Join this machine to a running Ray cluster as a worker node, detached, and return once it is in.
#
# Like start_head.sh: `ray start --block` in its own session (launch/stop.sh stops it by pid), and
# readiness from Ray itself: `ray start` prints "Ray runtime started." only after this node has
# registered with the head's GCS.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/join_worker.sh [options] HEAD:PORT [-- extra ray start args]

Starts `ray start --address=HEAD:PORT --block` detached and waits until the node has joined.
HEAD:PORT is what launch/start_head.sh printed (the GCS address, port 6379 by default).

options:
  --num-cpus N            CPUs this node offers (default: all)
  --num-gpus N            GPUs this node offers (default: all)
  --node-ip-address IP    the address the other nodes reach this one at (default: Ray picks)
  --temp-dir DIR          Ray's temp dir (keep it short: Ray's socket paths are limited to 107 bytes)
  --state-dir DIR         where worker-<n>.pid and worker-<n>.log go
                          (default ${FTCLUSTER_RAY_DIR:-$HOME/.ftcluster/ray})
  --timeout S             seconds to wait for the node to join (default 90)
  -h, --help              this help
Any other --option (or everything after --) is passed to `ray start` unchanged; a second node on the
same machine as another needs its own ports, e.g. --dashboard-agent-listen-port=N.

The node needs the cluster's Ray token (token authentication is always on): $RAY_AUTH_TOKEN, else the file
$RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. On the head's machine it is found by itself; on another, copy
the head's token file there (chmod 600) and set RAY_AUTH_TOKEN_PATH to it.

Stop it with launch/stop.sh worker-<n> (the name is printed), or launch/stop.sh to stop every node.
EOF
}

timeout=90 address="" state_dir="${FTCLUSTER_RAY_DIR:-$HOME/.ftcluster/ray}"
extra=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --num-cpus|--num-gpus|--node-ip-address|--temp-dir|--state-dir|--timeout)
      (($# >= 2)) || { echo "join_worker.sh: $1 needs a value" >&2; exit 2; }
      set -- "$1=$2" "${@:3}"; continue ;;
    --state-dir=*) state_dir="${1#*=}" ;;
    --timeout=*) timeout="${1#*=}" ;;
    --) shift; extra+=("$@"); break ;;
    --*) extra+=("$1") ;;
    *:*) [[ -z $address ]] || { echo "join_worker.sh: two head addresses given" >&2; exit 2; }; address=$1 ;;
    *) echo "join_worker.sh: expected HEAD:PORT, got '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n $address ]] || { usage >&2; exit 2; }

python=$(command -v python || command -v python3) || { echo "join_worker.sh: no python on PATH" >&2; exit 1; }
host=${address%:*} port=${address##*:}
# A wrong address would otherwise show up only as a ray start that retries for a minute.
if ! timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" 2>/dev/null; then
  echo "join_worker.sh: nothing answers at $address; start the head with launch/start_head.sh" \
       "and use the address it printed" >&2
  exit 1
fi

. "$(dirname "${BASH_SOURCE[0]}")/ray_auth.sh"
ray_token_setup join_worker.sh 0
mkdir -p "$state_dir"
n=1
# noclobber: creating the pid file claims the name, even with two joins running at once.
until (set -C; : >"$state_dir/worker-$n.pid") 2>/dev/null; do n=$((n + 1)); done
name="worker-$n" pid_file="$state_dir/worker-$n.pid" log="$state_dir/worker-$n.log"

export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
# On SIGTERM Ray first drains the node, waiting up to 30 s for every worker lease to come back (made
# for Serve replicas); a training run gains nothing from it, and stop.sh would wait it out.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
# Set to 0 (a single-machine setting, e.g. by a local ftcluster run) it refuses other nodes.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
# Ray starts its workers at nice 15, below everything else on the node: the ranks are the node's work.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
setsid "$python" -m ray.scripts.scripts start --block --log-color=false "--address=$address" \
  ${extra[@]+"${extra[@]}"} </dev/null >"$log" 2>&1 &
pid=$!
echo "$pid" >"$pid_file"

deadline=$((SECONDS + timeout))
until grep -q "Ray runtime started" "$log"; do
  if ! kill -0 "$pid" 2>/dev/null || ((SECONDS >= deadline)); then
    reason="ray start exited before the node joined"
    kill -0 "$pid" 2>/dev/null && reason="the node had not joined after ${timeout}s"
    echo "join_worker.sh: $reason; the last lines of $log:" >&2
    tail -n 30 "$log" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true  # half started: nothing to drain
    rm -f "$pid_file"
    exit 1
  fi
  sleep 0.5
done
echo "Ray worker node $name joined $address: pid $pid, log $log"
echo "  stop: launch/stop.sh $name"
