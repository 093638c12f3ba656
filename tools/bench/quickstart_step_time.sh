#!/usr/bin/env bash
# Seconds a quickstart binary takes from its "step FROM/" log line to its
# "step TO/" line (default 100 and 700), in a scratch directory so no
# runs/ of yours is touched; the run is stopped there. Compare two builds
# by running their binaries alternately on an idle machine:
#   bash tools/bench/quickstart_step_time.sh OLD_BIN; bash tools/bench/quickstart_step_time.sh NEW_BIN
# (docs/benchmarks.md, "Padding and pre-activations inside the conv").
set -euo pipefail
bin=$(realpath "$1")
from=${2:-100}
to=${3:-700}
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ln -s "$repo/assets" "$work/assets"
ln -s "$repo/configs" "$work/configs"
cd "$work"
"$bin" > log.txt 2>&1 &
pid=$!
t0=""
while kill -0 "$pid" 2> /dev/null; do
  if [[ -z "$t0" ]] && grep -q "^step $from/" log.txt; then t0=$(date +%s.%N); fi
  if [[ -n "$t0" ]] && grep -q "^step $to/" log.txt; then
    t1=$(date +%s.%N)
    kill "$pid"
    awk -v b="$bin" -v f="$from" -v t="$to" -v a="$t0" -v z="$t1" \
      'BEGIN { printf "%s: steps %s-%s in %.1f s\n", b, f, t, z - a }'
    exit 0
  fi
  sleep 0.05
done
echo "$bin ended before step $to:" >&2
tail -5 log.txt >&2
exit 1
