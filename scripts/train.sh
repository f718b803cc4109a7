#!/usr/bin/env bash
# Train MegaContext (warm start, then B1 -> B2 -> B3 cycles); see docs/training.md.
#   scripts/train.sh [CONFIG] [--set key=value ...] [--resume]
# CONFIG defaults to configs/train-smollm2-cpu.yaml. Extra arguments go to
# `megacontext train`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
CONFIG="${1:-configs/train-smollm2-cpu.yaml}"
[ $# -gt 0 ] && shift
exec "$PY" -m megacontext.cli train "$CONFIG" "$@"
