#!/usr/bin/env bash
# Run pytest while CPU cores are kept busy by a bounded background load, to show that no test
# passes only on an idle machine. The load is killed when this script ends, however it ends
# (exit, failure, Ctrl-C, SIGTERM); and it ends by itself after --max-seconds even if this
# script is killed with SIGKILL (each busy loop runs under `timeout`).
#
#   tests/stress.sh [--busy N] [--runs K] [--max-seconds S] [--] [PYTEST ARGS...]
#
#   --busy N         cores kept busy by a shell loop each (default 1; 0: no load)
#   --runs K         pytest K times in a row, stopping at the first failing run (default 1)
#   --max-seconds S  the load's own time limit (default 7200)
#
# `make test-stress` runs the whole suite this way, `make test-timing` the tests marked
# `timing` three times in a row (docs/DEVELOPING.md, Tests). Prints each run's exit status and
# wall time, then a summary line per run.
set -euo pipefail

busy=1
runs=1
max_seconds=7200
while [ $# -gt 0 ]; do
  case "$1" in
    --busy) busy="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --max-seconds) max_seconds="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
for n in "$busy" "$runs" "$max_seconds"; do
  case "$n" in
    '' | *[!0-9]*) echo "stress.sh: --busy, --runs and --max-seconds take whole numbers" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"

load_pids=()
stop_load() {
  local pid
  for pid in "${load_pids[@]}"; do
    kill "$pid" 2>/dev/null || true # `timeout` passes SIGTERM on to its loop
  done
  for pid in "${load_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  load_pids=()
}
trap stop_load EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for ((i = 0; i < busy; i++)); do
  timeout "$max_seconds" sh -c 'while :; do :; done' &
  load_pids+=("$!")
done
echo "stress: $busy of $(nproc) cores kept busy (load PIDs ${load_pids[*]:-none}," \
  "at most $max_seconds s); load average $(cut -d' ' -f1-3 /proc/loadavg)"

summary=()
status=0
for ((run = 1; run <= runs; run++)); do
  start=$(date +%s.%N)
  rc=0
  "$python" -m pytest "$@" || rc=$?
  took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  summary+=("run $run/$runs: pytest exit $rc in $took s (load average $(cut -d' ' -f1-3 /proc/loadavg))")
  echo "stress: ${summary[-1]}"
  if [ "$rc" -ne 0 ]; then
    status=$rc
    break
  fi
done
stop_load
echo "stress: summary ($busy busy core(s))"
printf '  %s\n' "${summary[@]}"
exit "$status"
