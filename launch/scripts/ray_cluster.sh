#!/usr/bin/env bash
# Start (or stop) a Ray cluster by hand, then run seqshard jobs on it.
#
#   on the head node:     launch/scripts/ray_cluster.sh head
#   on every other node:  launch/scripts/ray_cluster.sh worker <head-ip>
#   then, on the head:    seqshard run launch/configs/multinode_gpu.toml --address auto
#   when done, each node: launch/scripts/ray_cluster.sh stop
#
# Every node needs the same Python environment with seqshard installed (pip install -e .), and
# the job's output folder (job.out, which holds the checkpoints) on a filesystem all nodes see.
# Ports: 6379 (GCS) and 8265 (dashboard / job API) on the head; Ray also opens worker ports, and
# the process group opens MASTER_PORT on rank 0's node, so allow intra-cluster TCP.
set -euo pipefail

RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
# Resources Ray may hand out on this node; default: everything it detects.
NUM_CPUS="${NUM_CPUS:-}"
NUM_GPUS="${NUM_GPUS:-}"

resources=()
[[ -n "$NUM_CPUS" ]] && resources+=(--num-cpus "$NUM_CPUS")
[[ -n "$NUM_GPUS" ]] && resources+=(--num-gpus "$NUM_GPUS")

case "${1:-}" in
  head)
    # --dashboard-host 0.0.0.0 so `ray job submit --address http://<head-ip>:8265` works remotely
    ray start --head --port "$RAY_PORT" --dashboard-host 0.0.0.0 \
      --dashboard-port "$DASHBOARD_PORT" "${resources[@]}"
    echo "head up; on the other nodes run: $0 worker $(hostname -I | awk '{print $1}')"
    ;;
  worker)
    head_ip="${2:?usage: $0 worker <head-ip>}"
    ray start --address "$head_ip:$RAY_PORT" "${resources[@]}"
    ;;
  stop)
    ray stop
    ;;
  *)
    echo "usage: $0 head | worker <head-ip> | stop" >&2
    exit 2
    ;;
esac
