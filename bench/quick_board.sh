#!/usr/bin/env bash
# The quick (smoke-test) board on tiny-gpt2: its five entries, a gaussian curve, each entry verified (verify's
# default subset for 4 prompts is all 4), and the screenshot (a few minutes on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # a second thread mostly waits on a busy 2-core machine
invbench submit --protocol quick --name "No-defence" --defense none --device cpu
invbench submit --protocol quick --name "Gaussian-sigma-1.5" --defense gaussian --sigma 1.5 --device cpu
invbench submit --protocol quick --name "DP-clip-20-Z-0.5" --defense dp --clip 20 --noise-multiplier 0.5 --device cpu
invbench submit --protocol quick --name "Quantize-3-bits" --defense quantize --bits 3 --device cpu
invbench submit --protocol quick --name "Top-k 32 (example plug-in)" --defense topk --param k=32 --device cpu
invbench sweep --protocol quick --defense gaussian --param sigma=0,1.5,3 --device cpu
# verify each entry: the reports go to VERIFY.txt, the records beside the entries
{ echo "# invbench verify (default subset) of every entry of the quick board, $(date -u +%F), $(nproc)-core CPU"
  for entry in leaderboards/quick/*.json; do
    case $entry in *.verification.json) continue ;; esac
    echo "# invbench verify $entry --device cpu"
    invbench verify "$entry" --device cpu && echo "rc=0" || echo "rc=$?"
  done; } > leaderboards/quick/VERIFY.txt
invbench leaderboard --protocol quick
python -m invbench.screenshot leaderboards/quick/index.html docs/leaderboard-quick.png --height 1400
