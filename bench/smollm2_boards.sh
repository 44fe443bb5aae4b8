#!/usr/bin/env bash
# The SmolLM2 leaderboards, their curves and screenshots, from scratch (resumable: rerun to continue).
#
#   bash bench/smollm2_boards.sh [c4|random|render|all]   # from the repository root; default all
#
# ~40 runs of 5-30 minutes on 2 CPU cores. The parts can run side by side, one core each:
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
invbench sweep --protocol $C4 --defense gaussian --param sigma=0.003,0.01,0.03,0.1,0.3,1,3,10 --device cpu
# dp: sigma = 45 Z per coordinate, from Z 0.001 (sigma 0.045, keeps the text) to Z 1 (sigma 45)
invbench sweep --protocol $C4 --defense dp --param clip=45 --param noise_multiplier=0.001,0.003,0.01,0.03,0.1,1 \
  --device cpu
invbench sweep --protocol $C4 --defense quantize --param bits=8,6,4 --device cpu
for sigma in 0.003 0.01 0.03 0.1 0.3 1 3 10; do
  entry_from_sweep $C4 "Gaussian sigma $sigma" "runs/$C4/gaussian/sigma=$sigma" --defense gaussian --sigma "$sigma"
done
for z in 0.001 0.003 0.01 0.03 0.1 1; do
  entry_from_sweep $C4 "DP clip 45 Z $z" "runs/$C4/dp/clip=45,noise_multiplier=$z" --defense dp --clip 45 \
    --noise-multiplier "$z"
done
for bits in 8 6 4; do
  entry_from_sweep $C4 "Quantize $bits bits" "runs/$C4/quantize/bits=$bits" --defense quantize --bits "$bits"
done
invbench submit --protocol $C4 --name "No defence" --defense none --device cpu
invbench submit --protocol $C4 --name "Top-k 256 (example plug-in)" --defense topk --param k=256 --device cpu
published $C4
}

# --- the published defences, on both boards (issue 23) -------------------------------------------------
# dchi (Feyisetan et al. 2020): SplitLLM's DxPrivacy default, relative epsilon 5 (epsilon 5 d = 2,880 per unit L2);
# epsilon 500 keeps top-1 agreement about 0.9 on C4; epsilon 20 leaves 0.2. The norm-clipped variant at clip 45
# (about half of SmolLM2's last-layer states are longer: the 30-50% clip rate of the audit that broke it).
# laplace (VFLAIR-LLM's Laplace DP, L1 clip 600, just above the states' L1 norm of about 570): epsilon 8, where a
# pure per-vector guarantee means something; 20,000 (top-1 about 0.9); 1,000 (top-1 0.05).
published() {
local protocol=$1
invbench sweep --protocol "$protocol" --defense dchi --param dim=576 --param epsilon=20,500 --device cpu
invbench sweep --protocol "$protocol" --defense laplace --param clip=600 --param epsilon=8,1000,20000 --device cpu
entry_from_sweep "$protocol" "dchi eps 500" "runs/$protocol/dchi/dim=576,epsilon=500" --defense dchi --param dim=576 \
  --param epsilon=500
entry_from_sweep "$protocol" "dchi eps 20" "runs/$protocol/dchi/dim=576,epsilon=20" --defense dchi --param dim=576 \
  --param epsilon=20
invbench submit --protocol "$protocol" --name "dchi relative eps 5 (SplitLLM default)" --defense dchi --param dim=576 \
  --param relative_epsilon=5 --device cpu
for eps in 8 1000 20000; do
  entry_from_sweep "$protocol" "Laplace clip 600 eps $eps" "runs/$protocol/laplace/clip=600,epsilon=$eps" \
    --defense laplace --clip 600 --epsilon "$eps"
done
invbench submit --protocol "$protocol" --name "dchi clip 45 eps 200" --defense dchi --param dim=576 --param clip=45 \
  --param epsilon=200 --device cpu
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
invbench sweep --protocol $RANDOM_PROTOCOL --defense gaussian --param sigma=0.03,0.3,1 --device cpu
for sigma in 0.03 0.3 1; do
  entry_from_sweep $RANDOM_PROTOCOL "Gaussian sigma $sigma" "runs/$RANDOM_PROTOCOL/gaussian/sigma=$sigma" \
    --defense gaussian --sigma "$sigma"
done
published $RANDOM_PROTOCOL
}

# --- boards, curves, screenshots ----------------------------------------------------------------------
# The curves are drawn from the boards' committed entries (one point per entry), so render works on a fresh clone
# and a curve shows exactly the board's settings, wherever the sweeps' run folders are.
render() {
invbench leaderboard --protocol $C4
invbench leaderboard --protocol $RANDOM_PROTOCOL
invbench curve --protocol $C4 --from-entries --defense gaussian --defense dp --defense quantize --defense dchi \
  --defense laplace --out leaderboards/$C4/curves/all-defences.png
invbench curve --protocol $RANDOM_PROTOCOL --from-entries --defense gaussian --defense dp --defense dchi --defense laplace \
  --out leaderboards/$RANDOM_PROTOCOL/curves/all-defences.png
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
