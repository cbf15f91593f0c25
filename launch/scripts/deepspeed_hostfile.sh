#!/usr/bin/env bash
# Run a seqshard job with DeepSpeed's own launcher instead of Ray (no Ray needed).
# The launcher ssh-es into every host of the hostfile, starts `slots` processes per host and
# sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; each process runs
# `seqshard worker`, the same worker entry the Ray launcher uses.
#
#   launch/scripts/deepspeed_hostfile.sh launch/scripts/hostfile.example \
#       launch/configs/multinode_gpu.toml [--set k=v ...]
#
# Needs passwordless ssh from this node to every host, the same environment on all of them,
# and mesh.workers in the config equal to the total slots. Restarts after a failure are up to
# you (rerun the same command: workers resume from the newest intact checkpoint in job.out).
# Single node on CPU (e.g. to try it): DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 \
#   --no_local_rank --module seqshard.launch.cli worker launch/configs/demo.toml
set -euo pipefail

hostfile="${1:?usage: $0 <hostfile> <config.toml> [seqshard worker options]}"
config="${2:?usage: $0 <hostfile> <config.toml> [seqshard worker options]}"
shift 2
# first host of the hostfile hosts rank 0 and the rendezvous
master="$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1; exit}')"

deepspeed \
  --hostfile "$hostfile" \
  --master_addr "$master" \
  --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank \
  --module seqshard.launch.cli worker "$config" "$@"
