#!/usr/bin/env bash
# Quick start: install leptond into .venv, start a dev cluster (one master and two
# agents; simulated GPUs when this machine has no NVIDIA GPU), submit a GPU job,
# show its output, stop the cluster by its pid and exit with the job's status.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEV="$ROOT/.lepton-dev"

if [ ! -x .venv/bin/leptond ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/pip install -q .
fi
export PATH="$ROOT/.venv/bin:$PATH"
export LEPTON_CONFIG="$DEV/client.toml"   # keep the demo's config out of ~/.config

mkdir -p "$DEV"
leptond dev --data-dir "$DEV" --agents 2 >"$DEV/dev.out" 2>&1 &
DEV_PID=$!
cleanup() { kill "$DEV_PID" 2>/dev/null || true; wait "$DEV_PID" 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 1 120); do
    grep -q "cluster is up" "$DEV/dev.out" 2>/dev/null && break
    kill -0 "$DEV_PID" 2>/dev/null || { cat "$DEV/dev.out"; exit 1; }
    sleep 0.5
done
grep -q "cluster is up" "$DEV/dev.out" || { echo "dev cluster did not start"; cat "$DEV/dev.out"; exit 1; }
sed -n '/^====/,/^====/p' "$DEV/dev.out"

echo "\$ leptonctl nodes"
leptonctl nodes
echo "\$ leptonctl submit --gpus 1 --workdir examples -- .venv/bin/python gpu_job.py"
JOB=$(leptonctl submit --gpus 1 --workdir examples -- "$ROOT/.venv/bin/python" gpu_job.py)
echo "$JOB"
set +e
leptonctl logs -f "$JOB"
STATE=$(leptonctl status "$JOB" -o json | "$ROOT/.venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["state"])')
set -e
echo "\$ leptonctl status $JOB"
leptonctl status "$JOB"
[ "$STATE" = succeeded ]
