#!/usr/bin/env bash
# A new user's first ten minutes, timed: a fresh clone and virtual environment, the README's two commands as
# written, the main job again with its cache warm, and the help and listing commands, beside one CPU-bound job
# (a busy loop on one core, as on a shared machine). Prints one line per figure; docs/PERFORMANCE.md keeps the
# latest with its date and machine.
#
#   bash bench/studies/first_ten_minutes.sh [WORKDIR]      # from the repository root; WORKDIR default /tmp/first-run
#   BUSY=0 bash bench/studies/first_ten_minutes.sh           # no busy loop of its own (another job already runs)
#
# The model cache is a new folder (INVBENCH_CACHE), so the first run fetches the model as a new user's does;
# pip's own cache is the machine's, as it is for a user who has installed Python packages before.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-/tmp/first-run}
rm -rf "$WORK" && mkdir -p "$WORK"
git clone -q "$REPO" "$WORK/invbench"
cd "$WORK/invbench"
python3 -m venv .venv
. .venv/bin/activate
export INVBENCH_CACHE="$WORK/cache"
# A new user's shell: Python writes its byte-code caches (some sandboxes set PYTHONDONTWRITEBYTECODE, which makes
# every run compile the modules it imports again; with the README's `pip install --no-compile` that costs 15 s a run)
unset PYTHONDONTWRITEBYTECODE
if [ "${BUSY:-1}" != 0 ]; then
  python3 -c "while True: pass" &
  LOOP=$!
  trap 'kill $LOOP 2>/dev/null || true' EXIT
fi

seconds() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
now() { date +%s.%N; }

start=$(now)
pip install -q --no-compile torch==2.13.0 -e . > "$WORK/pip.log" 2>&1
installed=$(now)
invbench run --defense gaussian --sigma 0.01 > "$WORK/main-job.out" 2> "$WORK/main-job.err"
first=$(now)
invbench run --defense gaussian --sigma 0.01 --out "$WORK/warm" > "$WORK/warm.out" 2> "$WORK/warm.err"
warm=$(now)
echo "date: $(date -u +%F); machine: $(nproc) cores, $(uname -m); beside: ${BESIDE:-one busy loop}; load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "quickstart, install (pip install --no-compile torch==2.13.0 -e .): $(seconds "$start" "$installed") s"
echo "quickstart, main job, first run (model fetched, no codebook): $(seconds "$installed" "$first") s"
echo "quickstart, both: $(seconds "$start" "$first") s"
echo "main job, warm cache: $(seconds "$first" "$warm") s"
for command in "--help" "defenses" "attacks" "protocols" "run --help"; do
  a=$(now); invbench $command > /dev/null; b=$(now)
  echo "invbench $command: $(seconds "$a" "$b") s"
done
a=$(now)
pip install -q torch==2.13.0 -e ".[dev]" > "$WORK/pip-dev.log" 2>&1
b=$(now)
python -m pytest -q -p no:cacheprovider > "$WORK/tests.log" 2>&1 || true
c=$(now)
echo "test command, install: $(seconds "$a" "$b") s; tests: $(seconds "$b" "$c") s ($(tail -1 "$WORK/tests.log"))"
echo "main job's output: $WORK/main-job.out; its results folder: $(grep -o 'runs/[^/]*' "$WORK/main-job.out" | head -1)"
