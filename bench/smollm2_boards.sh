#!/usr/bin/env bash
# The SmolLM2 leaderboards (protocol version 3), every entry verified, their curves and screenshots, from scratch
# (resumable: rerun to continue; a finished entry, or one verified, is not done again).
#
#   bash bench/smollm2_boards.sh [c4|random|layer0|split1|published|published-last-layer|verify-c4|verify-random|verify-layer0|
#                                 verify-split1|redo PROTOCOL ATTACK [ids]|render|all]  # default all
#
# About a hundred runs of 2-20 minutes on 2 CPU cores. The parts can run side by side, one core each:
#   bash bench/smollm2_boards.sh c4 & bash bench/smollm2_boards.sh random; wait
# Two verify parts may share one board (each entry is locked while verified; VERIFY_ORDER=reverse starts at the end):
#   bash bench/smollm2_boards.sh verify-c4 & VERIFY_ORDER=reverse bash bench/smollm2_boards.sh verify-c4; wait
# `redo PROTOCOL ATTACK [ids]` drops one attack's records of those entries' runs (default: every entry) and resubmits.
# Each entry is made with `invbench submit` and checked with `invbench verify` (its default subset: 11 of 25
# prompts, or 4 of 5), whose reports go to the board's VERIFY.txt and records beside the entries; the curves
# are drawn from the entries.
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
# one BLAS thread per run: two threads per process on a 2-core box with two runs side by side is up to 20x slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
C4=c4-smollm2-10tok
RANDOM_PROTOCOL=random-smollm2-10tok
LAYER0=c4-smollm2-10tok-layer0
SPLIT1=c4-smollm2-10tok-split1
FISHER1=leaderboards/$SPLIT1/fisher-smollm2-layer1.safetensors

entry() {  # protocol, entry name, submit flags...; an entry already on the board is left as it is (a new submit
  local protocol=$1 name=$2; shift 2  # would rewrite its file, and the file a verification record vouches for)
  local id; id=$(python -c 'import sys; from invbench.entries import slugify; print(slugify(sys.argv[1]))' "$name")
  if [ -f "leaderboards/$protocol/$id.json" ]; then echo "entry $protocol/$id exists: left as it is"; return; fi
  invbench submit --protocol "$protocol" --name "$name" --device cpu "$@"
}

verify_board() {  # protocol: verify every entry without a passing record of the current format; reports to VERIFY.txt
  local protocol=$1 board=leaderboards/$1 paths
  [ -f "$board/VERIFY.txt" ] || echo "# invbench verify (default subset) of the entries of $protocol, this CPU" > "$board/VERIFY.txt"
  mkdir -p runs/locks
  paths=$(ls "$board"/*.json | grep -v '\.verification\.json$')
  [ "${VERIFY_ORDER:-}" = reverse ] && paths=$(echo "$paths" | tac)
  for path in $paths; do
    # one part at a time per entry (flock on the subshell's fd 9: released when it ends or its holder dies)
    ( flock -n 9 || exit 0
      python - "$path" <<'EOF' && exit 0
import sys
from pathlib import Path
from invbench.verification import entry_status
from invbench.entries import read_entry
sys.exit(0 if entry_status(read_entry(Path(sys.argv[1]))).verified else 1)
EOF
      report=$(mktemp)  # the whole report at once: two parts side by side do not interleave lines
      { echo "# $(date -u +%FT%TZ) invbench verify $path --device cpu"
        invbench verify "$path" --device cpu 2>/dev/null && echo "rc=0" || echo "rc=$?"; } > "$report"
      cat "$report" >> "$board/VERIFY.txt" && rm -f "$report"
    ) 9>"runs/locks/$protocol-$(basename "$path" .json).lock"
  done
}

# --- last layer, C4: the built-in defences' grids ---------------------------------------------------------
c4_board() {
entry $C4 "No defence" --defense none
for sigma in 0.003 0.01 0.03 0.1 0.3 1 3 10; do entry $C4 "Gaussian sigma $sigma" --defense gaussian --sigma "$sigma"; done
# dp: sigma = 45 Z per coordinate (clip 45: about half of the last-layer states are longer)
for z in 0.001 0.003 0.01 0.03 0.1 1; do entry $C4 "DP clip 45 Z $z" --defense dp --clip 45 --noise-multiplier "$z"; done
for bits in 8 6 4; do entry $C4 "Quantize $bits bits" --defense quantize --bits "$bits"; done
entry $C4 "Top-k 256 (example plug-in)" --defense topk --param k=256
last_layer_published $C4
}

# dchi (Feyisetan et al. 2020) at epsilon 500 (top-1 about 0.9), 20, SplitLLM's DxPrivacy default relative epsilon 5,
# the norm-clipped variant at clip 45; laplace (VFLAIR-LLM's Laplace DP, L1 clip 600, just above the states' L1
# norm of about 570) at epsilon 8 (a pure per-vector guarantee that means something), 1,000 and 20,000.
last_layer_published() {
local protocol=$1
entry "$protocol" "dchi eps 500" --defense dchi --param dim=576 --param epsilon=500
entry "$protocol" "dchi eps 20" --defense dchi --param dim=576 --param epsilon=20
entry "$protocol" "dchi relative eps 5 (SplitLLM default)" --defense dchi --param dim=576 --param relative_epsilon=5
entry "$protocol" "dchi clip 45 eps 200" --defense dchi --param dim=576 --param clip=45 --param epsilon=200
for eps in 8 1000 20000; do entry "$protocol" "Laplace clip 600 eps $eps" --defense laplace --clip 600 --epsilon "$eps"; done
}

# --- last layer, random ids: the middle settings -------------------------------------------------------------
random_board() {
entry $RANDOM_PROTOCOL "No defence" --defense none
entry $RANDOM_PROTOCOL "DP clip 45 Z 0.03" --defense dp --clip 45 --noise-multiplier 0.03
entry $RANDOM_PROTOCOL "DP clip 45 Z 0.1" --defense dp --clip 45 --noise-multiplier 0.1
entry $RANDOM_PROTOCOL "Quantize 6 bits" --defense quantize --bits 6
entry $RANDOM_PROTOCOL "Top-k 256 (example plug-in)" --defense topk --param k=256
for sigma in 0.03 0.3 1; do entry $RANDOM_PROTOCOL "Gaussian sigma $sigma" --defense gaussian --sigma "$sigma"; done
last_layer_published $RANDOM_PROTOCOL
}

# --- the input embeddings (layer 0; states' L2 norm about 2.8, 0.115 per coordinate) ------------------------------
layer0_board() {
entry $LAYER0 "No defence" --defense none
for sigma in 0.1 0.3 0.7 1 2; do entry $LAYER0 "Gaussian sigma $sigma" --defense gaussian --sigma "$sigma"; done
for z in 0.03 0.1 0.3 1; do entry $LAYER0 "DP clip 3 Z $z" --defense dp --clip 3 --noise-multiplier "$z"; done
for bits in 8 4; do entry $LAYER0 "Quantize $bits bits" --defense quantize --bits "$bits"; done
entry $LAYER0 "Top-k 256 (example plug-in)" --defense topk --param k=256
for eps in 1000 300 100; do entry $LAYER0 "dchi eps $eps" --defense dchi --param dim=576 --param epsilon="$eps"; done
# Laplace, L1 clip 80 (the embeddings' L1 norm is at most 81)
for eps in 5000 500 8; do entry $LAYER0 "Laplace clip 80 eps $eps" --defense laplace --clip 80 --epsilon "$eps"; done
}

# --- an early split (after block 1 of 30; states' L2 norm about 47, 2 per coordinate) ----------------------------
split1_board() {
entry $SPLIT1 "No defence" --defense none
for sigma in 0.3 1 3 10 30; do entry $SPLIT1 "Gaussian sigma $sigma" --defense gaussian --sigma "$sigma"; done
for z in 0.01 0.03 0.1 0.3 1; do entry $SPLIT1 "DP clip 50 Z $z" --defense dp --clip 50 --noise-multiplier "$z"; done
for bits in 8 4; do entry $SPLIT1 "Quantize $bits bits" --defense quantize --bits "$bits"; done
entry $SPLIT1 "Top-k 256 (example plug-in)" --defense topk --param k=256
for eps in 500 100 20; do entry $SPLIT1 "dchi eps $eps" --defense dchi --param dim=576 --param epsilon="$eps"; done
for eps in 20000 1000 8; do entry $SPLIT1 "Laplace clip 1000 eps $eps" --defense laplace --clip 1000 --epsilon "$eps"; done
}

# --- the published defences as their authors run them, at their placements (issue 36) ----------------------------
published() {
# input embeddings: SplitLLM's dchi sampler (one radius per prompt) at its experiments' relative epsilons (the snap to
# a token is left out: scoring it costs a sampled probability per candidate, GPU work), Split-N-Denoise at its etas
# (its client-side denoiser is not run: top-1 agreement is a lower bound; no clip: the authors' clip is for their models)
for rel in 0.1 0.2 0.4; do
  entry $LAYER0 "dchi SplitLLM relative eps $rel (shared radius)" --defense dchi --param dim=576 \
    --param relative_epsilon="$rel" --param shared_radius=true
done
for eta in 50 100 150; do entry $LAYER0 "Split-N-Denoise eta $eta" --defense snd --param eta="$eta" --param dim=576; done
# after block 1: VFLAIR-LLM's Laplace (DELTAF 10 for unlisted models, epsilon 50, no clip), DP-Forward (epsilon 8,
# delta 1e-5, the whole prompt clipped to norm 1), Bell's inverse-Fisher Gaussian at KL budgets 0.1 and 1
entry $SPLIT1 "Laplace VFLAIR-LLM DELTAF 10 eps 50" --defense laplace --param sensitivity=10 --epsilon 50
entry $SPLIT1 "DP-Forward eps 8" --defense dp-forward --epsilon 8 --delta 1e-5 --clip 1
for k in 0.1 1; do
  entry $SPLIT1 "Anisotropic Gaussian KL budget $k (inverse Fisher)" --defense aniso-gaussian --param kl_budget="$k" \
    --param fisher_file=$FISHER1
done
}

# --- the same published settings at the last layer, for comparison --------------------------------------------------
published_last_layer() {
for rel in 0.1 0.2 0.4; do
  entry $C4 "dchi SplitLLM relative eps $rel (shared radius)" --defense dchi --param dim=576 \
    --param relative_epsilon="$rel" --param shared_radius=true
done
entry $C4 "Laplace VFLAIR-LLM DELTAF 10 eps 50" --defense laplace --param sensitivity=10 --epsilon 50
entry $C4 "DP-Forward eps 8" --defense dp-forward --epsilon 8 --delta 1e-5 --clip 1
}

# --- an attack's records made again (after a fix that changes its answers) ------------------------------------------
# for each entry of a board: drop `attack`'s records from its run, then resubmit it with the entry's own defence,
# name and authors (the run resumes: only `attack` is run again; e.g. projection, whose answer depended on the
# prompts beside it before 2026-12-06 and so failed `verify`). The old entry and its verification record go.
# Resumable: a marker in the run says its records were dropped (an entry then missing is made by the board's part).
redo_attack() {  # protocol attack [entry ids...]: those entries only (default: every entry of the board)
local protocol=$1 attack=$2; shift 2
for path in leaderboards/"$protocol"/*.json; do
  case $path in *.verification.json) continue ;; esac
  local id; id=$(basename "$path" .json)
  if [ $# -gt 0 ] && [[ " $* " != *" $id "* ]]; then continue; fi
  [ -f "runs/$protocol/$id/records.jsonl" ] && [ ! -f "runs/$protocol/$id/redone-$attack" ] || continue
  python - "$protocol" "$path" "runs/$protocol/$id" "$attack" <<'EOF'
import json, sys
from pathlib import Path
from invbench.results import write_bytes_atomic
from invbench.submit import submit
from invbench.verification import record_path
protocol, path, run_dir, attack = sys.argv[1:]
records = Path(run_dir) / "records.jsonl"
lines = records.read_text().splitlines(keepends=True)
kept = [line for line in lines if json.loads(line).get("attack") != attack]
write_bytes_atomic(records, "".join(kept).encode())
(Path(run_dir) / f"redone-{attack}").touch()
print(f"{records}: {len(lines) - len(kept)} {attack} records dropped; resubmitting {path}", flush=True)
entry = json.loads(Path(path).read_text())
Path(path).unlink()
record_path(Path(path)).unlink(missing_ok=True)
submit(defense=entry["defense_spec"], defense_params=entry["summary"]["defense"]["params"], protocol=protocol,
       name=entry["name"], authors=entry["authors"], url=entry["url"], entry_id=Path(path).stem, device="cpu")
EOF
done
}

# --- boards, curves, screenshots ----------------------------------------------------------------------------------
render() {
for protocol in $C4 $RANDOM_PROTOCOL $LAYER0 $SPLIT1; do
  invbench leaderboard --protocol $protocol
  invbench curve --protocol $protocol --from-entries --defense gaussian --defense dp --defense quantize --defense dchi \
    --defense laplace --out leaderboards/$protocol/curves/all-defences.png
  python -m invbench.screenshot leaderboards/$protocol/index.html docs/leaderboard-$protocol.png
done
invbench curve --protocol $C4 --protocol $RANDOM_PROTOCOL --defense gaussian --compare \
  --out leaderboards/$RANDOM_PROTOCOL/curves/gaussian-c4-vs-random.png
}

case $PART in
  c4) c4_board ;;
  random) random_board ;;
  layer0) layer0_board ;;
  split1) split1_board ;;
  published) published ;;
  published-last-layer) published_last_layer ;;
  redo) shift; [ $# -ge 2 ] || { echo "usage: bash bench/smollm2_boards.sh redo PROTOCOL ATTACK [entry ids]" >&2; exit 2; }
        redo_attack "$@" ;;
  verify-c4) verify_board $C4 ;;
  verify-random) verify_board $RANDOM_PROTOCOL ;;
  verify-layer0) verify_board $LAYER0 ;;
  verify-split1) verify_board $SPLIT1 ;;
  render) render ;;
  all) c4_board; random_board; layer0_board; split1_board; published; published_last_layer
       for p in $C4 $RANDOM_PROTOCOL $LAYER0 $SPLIT1; do verify_board $p; done; render ;;
  *) echo "usage: bash bench/smollm2_boards.sh [c4|random|layer0|split1|published|published-last-layer|verify-<board>|redo PROTOCOL ATTACK [ids]|render|all]" >&2; exit 2 ;;
esac
