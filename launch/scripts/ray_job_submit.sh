#!/usr/bin/env bash
# Submit a seqshard job to a running Ray cluster through its job API (from any machine that
# reaches the head's dashboard port). The job's driver runs on the head node and joins the
# cluster with `--address auto`; its progress lines stream back here.
#
#   launch/scripts/ray_job_submit.sh <head-ip> launch/configs/multinode_gpu.toml [--set k=v ...]
#
# --working-dir uploads this checkout (configs included) to the cluster; seqshard itself must be
# installed on every node (pip install -e . on a shared checkout, or add it to runtime_env pip).
# `ray job status <id>` / `ray job logs -f <id>` / `ray job stop <id>` follow it afterwards.
set -euo pipefail

head_ip="${1:?usage: $0 <head-ip> <config.toml> [seqshard run options]}"
config="${2:?usage: $0 <head-ip> <config.toml> [seqshard run options]}"
shift 2

ray job submit \
  --address "http://${head_ip}:${DASHBOARD_PORT:-8265}" \
  --working-dir . \
  --runtime-env-json '{"env_vars": {"PYTHONUNBUFFERED": "1"}}' \
  -- seqshard run "$config" --address auto "$@"
