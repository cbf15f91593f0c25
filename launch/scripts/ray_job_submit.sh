#!/usr/bin/env bash
# Submit a seqshard job to a running Ray cluster through its job API (from any machine that
# reaches the head's dashboard port). The job's driver runs on the head node and joins the
# cluster with `--address auto`; its progress lines stream back here.
#
#   launch/scripts/ray_job_submit.sh <head-ip> launch/configs/multinode_gpu.toml [--set k=v ...]
#
# Needs Ray's job API, which the plain `ray` install.sh puts in does not have:
#   pip install -e '.[cluster]'     (ray[default] in the Ray range seqshard is tested with)
# and the head's dashboard listening where this machine reaches it (ray_cluster.sh head <ip>),
# and the cluster's auth token here (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH).
# --working-dir uploads this checkout (configs included) to the cluster; seqshard itself must be
# installed on every node (pip install -e . on a shared checkout, or add it to runtime_env pip).
# `ray job status <id>` / `ray job logs -f <id>` / `ray job stop <id>` follow it afterwards.
set -euo pipefail

head_ip="${1:?usage: $0 <head-ip> <config.toml> [seqshard run options]}"
config="${2:?usage: $0 <head-ip> <config.toml> [seqshard run options]}"
shift 2

# the job API's client side comes with ray[default] only (aiohttp, grpcio, ...)
if ! "${PYTHON:-python}" -c "import aiohttp, grpc, ray.job_submission" 2>/dev/null; then
  echo "$0: Ray's job API is not installed (ray[default]); run: pip install -e '.[cluster]'" >&2
  exit 2
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

ray job submit \
  --address "http://${head_ip}:${DASHBOARD_PORT:-8265}" \
  --working-dir . \
  --runtime-env-json '{"env_vars": {"PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "'"$RAY_AUTH_MODE"'"}}' \
  -- seqshard run "$config" --address auto "$@"
