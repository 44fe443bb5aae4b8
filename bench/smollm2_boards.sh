#!/usr/bin/env bash
# The SmolLM2 leaderboards, their curves and screenshots, from scratch (resumable: rerun to continue).
#
#   bash bench/smollm2_boards.sh [c4|random|render|all]   # from the repository root; default all
#
# ~20 runs of 5-30 minutes on 2 CPU cores. The parts can run side by side, one core each:
#   bash bench/smollm2_boards.sh c4 & bash bench/smollm2_boards.sh random; wait; bash bench/smollm2_boards.sh render
#
# Every entry is made with `invbench submit`. The gaussian, dp and quantize entries of the C4 board are the
# points of `invbench sweep` curves: each sweep point's run folder is linked as the entry's run folder, so
# `submit` finds the run finished (same configuration hash) and only writes the entry.
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
# one BLAS thread per run: two threads per process on a 2-core box with two runs side by side is up to 20x slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
C4=c4-smollm2-10tok
RANDOM_PROTOCOL=random-smollm2-10tok

entry_from_sweep() {  # protocol, entry name, sweep folder (runs/<protocol>/<defence>/<point>), submit flags...
  local protocol=$1 name=$2 point=$3; shift 3
  local id
  id=$(python -c "import sys; from invbench.entries import slugify; print(slugify(sys.argv[1]))" "$name")
  mkdir -p "runs/$protocol"
  [ -e "runs/$protocol/$id" ] || ln -s "$(realpath "$point")" "runs/$protocol/$id"
  invbench submit --protocol "$protocol" --name "$name" --device cpu "$@"
}

# --- C4 board: curves first, their points become entries ---------------------------------------
c4_board() {
invbench sweep --protocol $C4 --defense gaussian --param sigma=0.003,0.01,0.03,0.3,1,10 --device cpu
# dp: sigma = 45 Z per coordinate; Z 0.001 (sigma 0.045) keeps the text, 0.1 and 1 destroy the states. The middle
# multipliers (0.003-0.03, sigma 0.1-1.4) cost guided a whole-vocabulary pass per prompt (about an hour an entry on
# this CPU), so they are left to a GPU
invbench sweep --protocol $C4 --defense dp --param clip=45 --param noise_multiplier=0.001,0.1,1 --device cpu
invbench sweep --protocol $C4 --defense quantize --param bits=8,6,4 --device cpu
for sigma in 0.003 0.01 0.03 0.3 1 10; do
  entry_from_sweep $C4 "Gaussian sigma $sigma" "runs/$C4/gaussian/sigma=$sigma" --defense gaussian --sigma "$sigma"
done
for z in 0.001 0.1 1; do
  entry_from_sweep $C4 "DP clip 45 Z $z" "runs/$C4/dp/clip=45,noise_multiplier=$z" --defense dp --clip 45 \
    --noise-multiplier "$z"
done
for bits in 8 6 4; do
  entry_from_sweep $C4 "Quantize $bits bits" "runs/$C4/quantize/bits=$bits" --defense quantize --bits "$bits"
done
invbench submit --protocol $C4 --name "No defence" --defense none --device cpu
invbench submit --protocol $C4 --name "Top-k 256 (example plug-in)" --defense topk --param k=256 --device cpu
}

# --- random-token board: the middle settings, and a gaussian curve to compare with C4 -----------------
random_board() {
invbench submit --protocol $RANDOM_PROTOCOL --name "No defence" --defense none --device cpu
invbench submit --protocol $RANDOM_PROTOCOL --name "DP clip 45 Z 0.03" --defense dp --clip 45 --noise-multiplier 0.03 \
  --device cpu
invbench submit --protocol $RANDOM_PROTOCOL --name "DP clip 45 Z 0.1" --defense dp --clip 45 --noise-multiplier 0.1 \
  --device cpu
invbench submit --protocol $RANDOM_PROTOCOL --name "Quantize 6 bits" --defense quantize --bits 6 --device cpu
invbench submit --protocol $RANDOM_PROTOCOL --name "Top-k 256 (example plug-in)" --defense topk --param k=256 \
  --device cpu
invbench sweep --protocol $RANDOM_PROTOCOL --defense gaussian --param sigma=0.03,1 --device cpu
entry_from_sweep $RANDOM_PROTOCOL "Gaussian sigma 0.03" "runs/$RANDOM_PROTOCOL/gaussian/sigma=0.03" --defense gaussian \
  --sigma 0.03
}

# --- boards, curves, screenshots ----------------------------------------------------------------------
render() {
invbench leaderboard --protocol $C4
invbench leaderboard --protocol $RANDOM_PROTOCOL
invbench curve --protocol $C4 --out leaderboards/$C4/curves/all-defences.png
invbench curve --protocol $C4 --protocol $RANDOM_PROTOCOL --defense gaussian --compare \
  --out leaderboards/$RANDOM_PROTOCOL/curves/gaussian-c4-vs-random.png
python -m invbench.screenshot leaderboards/$C4/index.html docs/leaderboard-$C4.png
python -m invbench.screenshot leaderboards/$RANDOM_PROTOCOL/index.html docs/leaderboard-$RANDOM_PROTOCOL.png
}

case $PART in
  c4) c4_board ;;
  random) random_board ;;
  render) render ;;
  all) c4_board; random_board; render ;;
  *) echo "usage: bash bench/smollm2_boards.sh [c4|random|render|all]" >&2; exit 2 ;;
esac
