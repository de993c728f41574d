#!/usr/bin/env bash
# Start a Ray head node on this machine, detached, and return once it can take work.
#
# `ray start --block` runs in its own session, so launch/stop.sh can stop exactly this head (and every
# process it started) by its pid, without `ray stop`, which ends every Ray process on the machine.
# Readiness is read from the head itself, never from a fixed sleep: `ray start` prints
# "Ray runtime started." only after the node has registered with the GCS, and the GCS and dashboard
# ports must accept connections.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/start_head.sh [options] [-- extra ray start args]

Starts `ray start --head --block` detached, waits until it is ready, and prints the addresses to use.

options:
  --port N                GCS port (default 6379)
  --dashboard-port N      dashboard / Ray Jobs API port (default 8265)
  --dashboard-host H      interface the dashboard listens on (default 127.0.0.1: jobs are submitted
                          from this machine; 0.0.0.0 to submit from others)
  --no-dashboard          no dashboard (and no Ray Jobs submission)
  --num-cpus N            CPUs this node offers (default: all)
  --num-gpus N            GPUs this node offers (default: all)
  --node-ip-address IP    the address other nodes reach this one at (default: Ray picks)
  --temp-dir DIR          Ray's temp dir (keep it short: Ray's socket paths are limited to 107 bytes)
  --state-dir DIR         where head.pid and head.log go (default ${FTCLUSTER_RAY_DIR:-$HOME/.ftcluster/ray})
  --timeout S             seconds to wait for readiness (default 90)
  -h, --help              this help
Any other --option (or everything after --) is passed to `ray start` unchanged.

Ray is the one installed for the `python` on PATH, and Ray Jobs (ftcluster train with an http:// address)
run that `python` too: activate the environment you train with first.

Ray's token authentication is always on (RAY_AUTH_MODE=token): every node, client and dashboard request
needs the cluster's token. It is $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token
(made here when missing; kept readable by its owner only). On this machine `ftcluster jobs`, ftcluster train
and join_worker.sh find it by themselves; on another, copy the file there and set RAY_AUTH_TOKEN_PATH to it.
Secrets the jobs need (HF_TOKEN, WANDB_API_KEY) go in this script's environment: every job inherits it,
and nothing shows it on the dashboard (a job's runtime_env is shown there).
Stop it with launch/stop.sh head (or launch/stop.sh to stop every node started from this state dir).
EOF
}

port=6379 dashboard_port=8265 dashboard_host=127.0.0.1 dashboard=true timeout=90
node_ip="" state_dir="${FTCLUSTER_RAY_DIR:-$HOME/.ftcluster/ray}"
extra=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --port|--dashboard-port|--dashboard-host|--num-cpus|--num-gpus|--node-ip-address|--temp-dir|--state-dir|--timeout)
      (($# >= 2)) || { echo "start_head.sh: $1 needs a value" >&2; exit 2; }
      set -- "$1=$2" "${@:3}"; continue ;;
    --port=*) port="${1#*=}" ;;
    --dashboard-port=*) dashboard_port="${1#*=}" ;;
    --dashboard-host=*) dashboard_host="${1#*=}" ;;
    --no-dashboard) dashboard=false ;;
    --num-cpus=*|--num-gpus=*|--temp-dir=*) extra+=("$1") ;;
    --node-ip-address=*) node_ip="${1#*=}"; extra+=("$1") ;;
    --state-dir=*) state_dir="${1#*=}" ;;
    --timeout=*) timeout="${1#*=}" ;;
    --) shift; extra+=("$@"); break ;;
    --*) extra+=("$1") ;;
    *) echo "start_head.sh: unexpected argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

python=$(command -v python || command -v python3) || { echo "start_head.sh: no python on PATH" >&2; exit 1; }
. "$(dirname "${BASH_SOURCE[0]}")/ray_auth.sh"
ray_token_setup start_head.sh 1
mkdir -p "$state_dir"
pid_file="$state_dir/head.pid" log="$state_dir/head.log"
if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  echo "start_head.sh: a head started from $state_dir is already running (pid $(cat "$pid_file"));" \
       "stop it with launch/stop.sh head" >&2
  exit 1
fi

export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
# On SIGTERM Ray first drains the node, waiting up to 30 s for every worker lease to come back (made
# for Serve replicas); a training run gains nothing from it, and stop.sh would wait it out.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
# Set to 0 (a single-machine setting, e.g. by a local ftcluster run) it refuses other nodes.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
# Ray starts its workers at nice 15, below everything else on the node: the ranks are the node's work.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"
dash_args=(--include-dashboard=false)
[[ $dashboard == true ]] &&
  dash_args=(--include-dashboard=true "--dashboard-host=$dashboard_host" "--dashboard-port=$dashboard_port")
# setsid: its own session and process group, so stop.sh can find everything it started by this pid.
setsid "$python" -m ray.scripts.scripts start --head --block --log-color=false "--port=$port" "${dash_args[@]}" \
  ${extra[@]+"${extra[@]}"} </dev/null >"$log" 2>&1 &
pid=$!
echo "$pid" >"$pid_file"

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
fail() {
  echo "start_head.sh: $1; the last lines of $log:" >&2
  tail -n 30 "$log" >&2
  kill -KILL -- "-$pid" 2>/dev/null || true  # half started: nothing to drain
  rm -f "$pid_file"
  exit 1
}

deadline=$((SECONDS + timeout))
until grep -q "Ray runtime started" "$log" && port_open 127.0.0.1 "$port" \
      && { [[ $dashboard == false ]] || port_open "${dashboard_host/0.0.0.0/127.0.0.1}" "$dashboard_port"; }; do
  kill -0 "$pid" 2>/dev/null || fail "ray start exited before the head was ready"
  ((SECONDS < deadline)) || fail "the head was not ready after ${timeout}s"
  sleep 0.5
done

# The address Ray chose (it may replace a loopback --node-ip-address with the machine's own).
ip=$(sed -n 's/.*Local node IP: *\([^ ]*\).*/\1/p' "$log" | head -n 1)
ip=${ip:-${node_ip:-127.0.0.1}}
dash_ip=$dashboard_host
[[ $dash_ip == 0.0.0.0 ]] && dash_ip=$ip
echo "Ray head is up: pid $pid, log $log"
echo "  Ray token auth is on; token: $ray_token_shown (another machine: RAY_AUTH_TOKEN_PATH=<a copy of it>)"
[[ $dashboard == true ]] &&
  echo "  submit a run as a Ray Job:  ftcluster train launcher=ray launcher.address=http://$dash_ip:$dashboard_port ..."
echo "  join from the driver:       ftcluster train launcher=ray launcher.address=$ip:$port ..."
echo "  add a node (run there):     launch/join_worker.sh $ip:$port"
echo "  stop:                       launch/stop.sh head   (or launch/stop.sh: every node in $state_dir)"
