#!/usr/bin/env bash
# Stage the SmolLM2-135M GGUF (98 MB) on the GPU device machine, which has no PyPI and accepts at
# most 64 MiB per call, the working tree (about 20 MiB) included: send it in parts, one call each,
# made back to back.
#
# 1. Here, with the venv active (finds the GGUF like the loader does, fetching it if needed):
#        bash bench/fetch_smollm2_for_device.sh prepare
#    -> .model1/ .. .modelN/ in the repo root (N = PARTS, default 3, about 31 MiB each; ignore them
#    in .git/info/exclude with `/.model*/`); prints the sha256.
# 2. Device calls 1 .. N-1, one after the other:
#        run(carry=[".modelK"], command="bash bench/fetch_smollm2_for_device.sh stage")
#    each copies its part into /root/stage.
# 3. The last call, right after: /root/stage lives only while the machine stays warm, and an idle one
#    is handed back after `status`'s idle_release_s (30 s when written), so issue it straight away:
#        run(carry=[".modelN"], command='eval "$(bash bench/fetch_smollm2_for_device.sh join)" && python ...')
#    adds its part, joins them into /root/stage/SmolLM2-135M-Instruct.Q4_1.gguf, checks the sha256 and
#    prints
#        export INVBENCH_SMOLLM2_GGUF=/root/stage/SmolLM2-135M-Instruct.Q4_1.gguf
#    as its only stdout line (messages go to stderr), so `eval` sets it for that call; later calls on
#    the same warm machine just run that export line themselves.
# STAGE_DIR overrides /root/stage; PYTHON overrides the interpreter used by `prepare`; PARTS the count.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
STAGE="${STAGE_DIR:-/root/stage}"
PYTHON="${PYTHON:-python}"
PARTS="${PARTS:-3}"

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
    local gguf k
    gguf="$("$PYTHON" -c 'import sys
from invbench.leaks.smollm2 import default_cache_dir, find_gguf
print(find_gguf(default_cache_dir(), notify=lambda line: print(line, file=sys.stderr)))')" \
        || die "could not find or fetch the GGUF (is the venv active?)"
    rm -rf "$ROOT"/.model[0-9]*
    mkdir -p "$ROOT/.split"
    # -> .part0 .. .part{N-1}, equal parts by bytes; part k-1 goes to .modelk
    split -n "$PARTS" -a 1 -d "$gguf" "$ROOT/.split/$NAME.part"
    for ((k = 1; k <= PARTS; k++)); do
        mkdir -p "$ROOT/.model$k"
        mv "$ROOT/.split/$NAME.part$((k - 1))" "$ROOT/.model$k/"
    done
    rmdir "$ROOT/.split"
    say "from $gguf"
    du -h "$ROOT"/.model[0-9]*/* >&2
    echo "sha256 $(sha256sum "$gguf" | cut -d' ' -f1)  $NAME"
}

# Copy the carried part(s) into the stage folder.
stage() {
    compgen -G "$ROOT/.model[0-9]*/$NAME.part*" >/dev/null \
        || die "no .modelK/ part here: carry one (carry=[\".model1\"]) after running prepare"
    mkdir -p "$STAGE"
    cp "$ROOT"/.model[0-9]*/"$NAME".part* "$STAGE/"
    say "staged $(cd "$STAGE" && ls "$NAME".part* | tr '\n' ' ')in $STAGE"
}

join() {
    local target="$STAGE/$NAME" actual
    stage
    cat "$STAGE/$NAME".part* > "$target.tmp"  # part0, part1, ...: the glob sorts them
    actual="$(sha256sum "$target.tmp" | cut -d' ' -f1)"
    if [[ "$actual" != "$(expected_sha)" ]]; then
        rm -f "$target.tmp"
        die "joined file has sha256 $actual, expected $(expected_sha): a part is missing or stale (staged: $(ls "$STAGE" | tr '\n' ' ')); redo prepare and the stage calls"
    fi
    mv "$target.tmp" "$target"
    rm -f "$STAGE/$NAME".part*
    say "verified $target"
    echo "export INVBENCH_SMOLLM2_GGUF=$target"
}

case "${1:-}" in
    prepare) prepare ;;
    stage) stage ;;
    join) join ;;
    *) echo "usage: $0 prepare|stage|join (see the comment at the top)" >&2; exit 2 ;;
esac
