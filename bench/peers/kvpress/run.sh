#!/usr/bin/env bash
# Run kvpress as a peer of a megacontext evaluation run, from its own environment.
#
#   bash bench/peers/kvpress/run.sh artifacts/reports/<run> [--presses snapkv,knorm,...]
#   megacontext report artifacts/reports/<run>
#
# Builds bench/peers/kvpress/.venv (Python 3.11, uv) from requirements.txt the first
# time (and again when requirements.txt changes), then runs kvpress_peer.py, which
# writes <run>/peers/kvpress.parquet. torch comes from $KVPRESS_TORCH_WHEEL (default:
# the local CPU wheel under /opt/wheels) when that file exists, else from PyPI.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
run="${1:?usage: run.sh RUN_DIR [--presses NAME,...]}"
shift
venv="$here/.venv"
wheel="${KVPRESS_TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
torch_req="torch>=2.3.1,<3"
[[ -f "$wheel" ]] && torch_req="$wheel"
want="$(cat "$here/requirements.txt" <(echo "$torch_req") | sha256sum | cut -d' ' -f1)"
stamp="$venv/.requirements.sha256"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "kvpress peer: building $venv (torch: $torch_req)" >&2
  uv venv --python 3.11 --allow-existing "$venv" >&2
  uv pip install --python "$venv/bin/python" "$torch_req" -r "$here/requirements.txt" >&2
  echo "$want" >"$stamp"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
exec "$venv/bin/python" "$here/kvpress_peer.py" "$run" "$@"
