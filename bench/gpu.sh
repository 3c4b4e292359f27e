#!/usr/bin/env bash
# The GPU benchmark in one command (about 8 minutes on one H100/H200):
#   bench/gpu.sh DATA_ROOT [OUT] [--tiny] [other bench/paper.py options, e.g. --precision fp32]
# DATA_ROOT holds mnist/ and fashion-mnist/ IDX files as `ternarize data fetch` lays them out
# (carry it to a machine without network). OUT (default bench-out) gets paper.json, paper.md and
# paper.log. Relative paths are taken from the current folder. The first argument that starts
# with '-' and all after it go to bench/paper.py; --tiny runs a small configuration that finishes
# on a CPU in about a minute. A bad argument is one line on stderr and exit code 2; a run that fails
# before its first result removes the OUT folder it made, and one in which a step failed keeps the
# others' results (exit code 1). It runs `python3` (or $PYTHON), which must import torch and numpy.
set -euo pipefail
usage="usage: bench/gpu.sh DATA_ROOT [OUT] [--tiny]"
fail() { echo "gpu.sh: $1" >&2; exit 2; }
case ${1:-} in
  -h|--help) echo "$usage"; exit 0 ;;
  ''|-*) fail "DATA_ROOT is missing; $usage" ;;
esac
data=$1; shift
out=bench-out
if [ $# -gt 0 ] && [[ $1 != -* ]]; then out=$1; shift; fi
for arg in "$@"; do
  case $arg in
    --data-dir*|--out*) fail "$arg: give DATA_ROOT and OUT as the first two arguments; $usage" ;;
  esac
done
[ -n "$out" ] || fail "OUT is empty; give a folder name"
# absolute paths: the script runs from the checkout, the caller named them from here
[[ $data == /* ]] || data=$PWD/$data
[[ $out == /* ]] || out=$PWD/$out
[ -d "$data" ] || fail "DATA_ROOT $data is not a folder; give the folder that holds mnist/ and fashion-mnist/"
if [ -e "$out" ] && [ ! -d "$out" ]; then fail "OUT $out is not a folder; choose another OUT"; fi
py=${PYTHON:-python3}
if [[ $py == */* && $py != /* ]]; then py=$PWD/$py; fi  # a relative path, from here (the script moves on)
"$py" -c "import torch, numpy" 2>/dev/null \
  || fail "$py cannot import torch and numpy; activate the environment that has them (or set PYTHON)"
made=()  # the folders made here, deepest first: removed again when the run fails
d=$out
while [ ! -e "$d" ] && [ ! -L "$d" ]; do made+=("$d"); d=$(dirname "$d"); done
mkdir -p -- "$out" 2>/dev/null || fail "cannot create the folder $out; choose another OUT"
cd "$(dirname "$0")/.."
# the package runs from the checkout: torch and numpy are all these scripts need
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rc=0
# paper.log gets both streams; the terminal gets each on its own (errors stay on stderr)
: > "$out/paper.log"
{ "$py" bench/paper.py --data-dir "$data" --out "$out" "$@" 2>&1 1>&3 3>&- \
    | tee -a "$out/paper.log" >&2; } 3>&1 | tee -a "$out/paper.log" || rc=$?
# a run that failed before any result: nothing stays; one whose step failed keeps what it measured
if [ "$rc" -ne 0 ] && [ ${#made[@]} -gt 0 ] && [ ! -e "$out/paper.json" ]; then
  rm -f -- "$out/paper.log"
  for d in "${made[@]}"; do rmdir -- "$d" 2>/dev/null || break; done
fi
exit "$rc"
