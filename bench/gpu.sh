#!/usr/bin/env bash
# The GPU benchmark in one command (about 8 minutes on one H100/H200):
#   bench/gpu.sh DATA_ROOT [OUT] [--tiny]
# DATA_ROOT holds mnist/ and fashion-mnist/ IDX files as `ternarize data fetch` lays them out
# (carry it to a machine without network). Writes OUT/paper.json, OUT/paper.md and OUT/paper.log.
# --tiny runs a small configuration that finishes on a CPU in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: bench/gpu.sh DATA_ROOT [OUT] [--tiny]}
out=${2:-bench-out}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$out"
# the package runs from the checkout: torch and numpy are all these scripts need
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 bench/paper.py --data-dir "$data" --out "$out" "$@" 2>&1 | tee "$out/paper.log"
