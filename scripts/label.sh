#!/usr/bin/env bash
# Counterfactual ΔNLL/ΔKL labels on on-policy snapshots -> artifacts/deltas/<run>/.
#   scripts/label.sh [CONFIG] [--checkpoint DIR] [--windows N] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
CONFIG="${1:-configs/train-smollm2-cpu.yaml}"
[ $# -gt 0 ] && shift
exec "$PY" -m megacontext.cli label "$CONFIG" "$@"
