#!/usr/bin/env bash
# Start (or stop) a Ray cluster by hand, then run seqshard jobs on it. See launch/README.md.
#
#   on the head node:     launch/scripts/ray_cluster.sh head [HOST] [ray start options ...]
#   on every other node:  launch/scripts/ray_cluster.sh worker <head-ip> [ray start options ...]
#   then, on the head:    RAY_AUTH_MODE=token seqshard run CONFIG.toml --address <head-ip>:6379
#   when done, each node: launch/scripts/ray_cluster.sh stop      (stops every Ray on the node)
#
# HOST is the interface this node's Ray registers and its dashboard / job API listen on:
# 127.0.0.1 (the default) keeps the dashboard on this machine; give the node's cluster-network
# IP for a multi-node cluster. Ray 2.60 registers a node under a routable IP and its GCS,
# raylet and worker gRPC ports listen on every interface for a multi-node cluster, so the
# cluster runs with token auth (RAY_AUTH_MODE=token): the head creates ~/.ray/auth_token if
# there is none, and every node and driver needs that same token (a shared home, a copy of the
# file, RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file>). Keep the ports below, MASTER_PORT
# and Ray's worker ports open between cluster nodes only.
#
# Every node needs the same Python environment with seqshard installed (pip install -e .), and
# the job's output folder (job.out, which holds the checkpoints) on a filesystem all nodes see.
set -euo pipefail

RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
# Resources Ray may hand out on this node; default: everything it detects.
NUM_CPUS="${NUM_CPUS:-}"
NUM_GPUS="${NUM_GPUS:-}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

resources=()
[[ -n "$NUM_CPUS" ]] && resources+=(--num-cpus "$NUM_CPUS")
[[ -n "$NUM_GPUS" ]] && resources+=(--num-gpus "$NUM_GPUS")

have_token() {
  [[ -n "${RAY_AUTH_TOKEN:-}" ]] || [[ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]
}

case "${1:-}" in
  head)
    shift
    host=127.0.0.1
    if [[ $# -gt 0 && "$1" != -* ]]; then host="$1"; shift; fi
    node_ip=()
    # Ray rewrites a loopback node IP to the routable one anyway; name only a real interface
    [[ "$host" != 127.* && "$host" != ::1 && "$host" != localhost ]] && node_ip=(--node-ip-address "$host")
    if [[ "$RAY_AUTH_MODE" == token ]] && ! have_token; then
      ray get-auth-token --generate >/dev/null  # writes ~/.ray/auth_token
    fi
    ray start --head --port "$RAY_PORT" "${node_ip[@]}" --dashboard-host "$host" \
      --dashboard-port "$DASHBOARD_PORT" "${resources[@]}" "$@"
    echo "head up; give the other nodes its token (${RAY_AUTH_TOKEN_PATH:-~/.ray/auth_token})," \
         "then on each run: $0 worker <this node's cluster IP>"
    ;;
  worker)
    head_ip="${2:?usage: $0 worker <head-ip> [ray start options ...]}"
    shift 2
    if [[ "$RAY_AUTH_MODE" == token ]] && ! have_token; then
      echo "$0: no Ray auth token on this node: copy the head's ~/.ray/auth_token here, or set" \
           "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH (or RAY_AUTH_MODE=disabled on a trusted network)" >&2
      exit 2
    fi
    ray start --address "$head_ip:$RAY_PORT" "${resources[@]}" "$@"
    ;;
  stop)
    ray stop
    ;;
  *)
    echo "usage: $0 head [HOST] [ray start options] | worker <head-ip> [ray start options] | stop" >&2
    exit 2
    ;;
esac
