"""One run over many workers (issue 40), without a cluster: the sharded path (`invbench.sharding`) with its
shards run in this process as a Ray worker runs them (`InProcess`), and joining a cluster (`invbench.cluster`)
with a stand-in for Ray. The real cluster (two `ray start` nodes, one killed mid-run) is tests/test_cluster.py.

The guarantees are the unsharded run's (tests/test_reliability.py): the same records and summary (bit for bit
when a shard is one of the unsharded run's batches), one writer, a lost shard costs its prompts only and the
same command finishes them."""
from __future__ import annotations

import json
import os
import socket
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import invoke, spy_on_attacks
from invbench import cluster, runner, sharding
from invbench.attacks import available_attacks
from invbench.cluster import ClusterError, Engine
from invbench.config import RunConfig
from invbench.sharding import InProcess, ShardError

TIMING = {"seconds_per_token", "wall_seconds", "tokens_per_second", "device"}
# Small and deterministic, two attacks so the order of the records (attack, then prompt) is tested too; tiny-bytes
# (a 257-token vocabulary): guided with the prior verifies half the vocabulary a position on a random model.
CFG = RunConfig(model="tiny-bytes", n=3, tokens=2, device="cpu", attacks=["guided", "continuous"], preset="fast",
                attack_options={"steps": 3, "candidates": 3, "ranker": "prior"}, batch_size=1)


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def folder_of(out: Path) -> dict:
    """What a finished results folder holds, timings aside: records in file order, summary, config hash."""
    return {"records": [strip(json.loads(line)) for line in (out / "records.jsonl").read_bytes().splitlines()],
            "summary": strip(json.loads((out / "summary.json").read_text())),
            "config_hash": json.loads((out / "config.json").read_text())["config_hash"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    """The unsharded run of CFG."""
    out = tmp_path_factory.mktemp("unsharded") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        runner.run(replace(CFG, out=str(out)), echo=lambda line: None)
    return folder_of(out)


def test_a_sharded_run_equals_the_unsharded_one_bit_for_bit(tmp_path, reference):
    """A shard of one prompt is one of the unsharded run's batches (--batch-size 1): the same records, in the same
    order (attack, then prompt: the shards finished in another order are put back), the same summary and hash."""
    out = tmp_path / "run"
    lines = []
    summary = runner.run_sharded(replace(CFG, out=str(out)), InProcess(slots=2), echo=lines.append)
    found = folder_of(out)
    assert found == reference
    assert [(r["attack"], r["prompt_index"]) for r in found["records"]] == [
        (a, i) for a in ("guided", "continuous") for i in range(3)]
    assert summary.config_hash == reference["config_hash"]
    assert "sharded: 6 shard(s) of at most 1 prompt(s) over 2 processes" in lines


def test_shards_finished_out_of_order_are_written_in_prompt_order(tmp_path, reference):
    class Reversed(InProcess):
        def next_done(self, handles):  # the last submitted finishes first
            last = [h for h, _ in self._queue if h in handles][-1]
            return super().next_done([last])

    out = tmp_path / "run"
    runner.run_sharded(replace(CFG, out=str(out)), Reversed(slots=3), echo=lambda line: None)
    assert folder_of(out) == reference


def test_a_lost_shard_costs_its_prompts_only_and_the_same_command_finishes_it(tmp_path, reference, monkeypatch):
    """A worker that dies mid-shard (here: its task fails) loses that shard: the other shards are on disk, the run
    ends with one line saying what is missing and what to do, and the rerun attacks only the missing prompt."""
    cls = available_attacks()["continuous"]
    real = cls.run

    def dies_on_prompt_1(self, oracle, targets, *, prompt_indices, **kw):
        if 1 in prompt_indices:
            raise RuntimeError("worker lost")
        return real(self, oracle, targets, prompt_indices=prompt_indices, **kw)

    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(cls, "run", dies_on_prompt_1)
        with pytest.raises(ShardError) as info:
            runner.run_sharded(replace(CFG, out=str(out)), InProcess(slots=2), echo=lambda line: None)
    message = str(info.value)
    assert "\n" not in message and "1 of 6 shards failed (1 prompt results missing" in message
    assert "continuous on prompts 1: RuntimeError: worker lost" in message and "rerun the same command" in message
    saved = [json.loads(line) for line in (out / "records.jsonl").read_bytes().splitlines()]
    assert sorted((r["attack"], r["prompt_index"]) for r in saved) == sorted(
        [("guided", i) for i in range(3)] + [("continuous", 0), ("continuous", 2)])
    assert not (out / "summary.json").exists()

    attacked = spy_on_attacks(monkeypatch)
    runner.run_sharded(replace(CFG, out=str(out)), InProcess(slots=2), echo=lambda line: None)
    assert attacked == [1]
    assert folder_of(out) == reference


def test_a_sharded_run_resumes_an_unsharded_one_and_the_other_way(tmp_path, reference, monkeypatch):
    """Where the work ran is not part of the run: either path resumes the other's folder."""
    out = tmp_path / "run"
    cls = available_attacks()["continuous"]
    real = cls.run
    with monkeypatch.context() as mp:  # the unsharded run stops at continuous's second prompt
        mp.setattr(cls, "run", lambda self, *a, prompt_indices, **kw: (_ for _ in ()).throw(KeyboardInterrupt)
                   if prompt_indices == [1] else real(self, *a, prompt_indices=prompt_indices, **kw))
        with pytest.raises(runner.RunInterrupted):
            runner.run(replace(CFG, out=str(out)), echo=lambda line: None)
    attacked = spy_on_attacks(monkeypatch)
    runner.run_sharded(replace(CFG, out=str(out)), InProcess(slots=2), echo=lambda line: None)
    assert attacked == [1, 2]
    assert folder_of(out) == reference


def test_what_a_worker_returns_is_checked_before_it_is_written(tmp_path):
    """The driver is the one writer: a shard's records must be whole and of that shard, or nothing is written."""
    class Forger(InProcess):
        def next_done(self, handles):
            handle, result = super().next_done(handles)
            result.records[0]["exact_match"] = not result.records[0]["exact_match"]  # no longer follows from the ids
            return handle, result

    out = tmp_path / "run"
    with pytest.raises(ShardError, match="a worker returned a record that is not whole .*exact_match"):
        runner.run_sharded(replace(CFG, out=str(out)), Forger(), echo=lambda line: None)
    assert not (out / "records.jsonl").exists() or (out / "records.jsonl").read_bytes() == b""


def test_a_worker_set_up_unlike_the_driver_is_refused(one_thread, monkeypatch):
    """Another model file, invbench or plug-in on a node would mix another run's answers into this one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, device, defense, attacks = runner.prepare(CFG, echo=lambda line: None)
    loaded = runner.load_model(cfg.model, seed=cfg.seed, notify=lambda line: None)
    oracle = runner.white_box(loaded, layer=cfg.layer, device=device)
    expected = sharding.identity(cfg, oracle, loaded, defense, attacks)
    assert sharding.differences(expected, json.loads(json.dumps(expected))) == []  # as JSON: tuples are lists
    other = {**expected, "weights": "0" * 64}
    sharding._WORKERS.clear()
    with pytest.raises(ShardError, match=r"is not set up as the driver: its weights differs from the driver's; install "
                                         "the same invbench, model files and defence plug-ins on every node"):
        sharding.attack_shard(cfg, other, "continuous", None)


def test_shards_spread_the_pending_prompts_over_the_slots():
    attacks = [types.SimpleNamespace(name="a"), types.SimpleNamespace(name="b")]
    leak = types.SimpleNamespace(prompts=[types.SimpleNamespace(index=i) for i in range(10)])
    shards = sharding.plan(attacks, leak, {("a", 0), ("a", 1), ("b", 9)}, slots=3, batch_size=256, asked=None)
    assert [(s.attack, s.rows) for s in shards] == [("a", [2, 3, 4]), ("a", [5, 6, 7]), ("a", [8, 9]),
                                                    ("b", [0, 1, 2]), ("b", [3, 4, 5]), ("b", [6, 7, 8])]
    assert cluster.shard_size(1000, slots=8, batch_size=64) == 64  # at most a batch
    assert cluster.shard_size(25, slots=100, batch_size=256) == 1
    assert cluster.shard_size(25, slots=4, batch_size=256, asked=10) == 10


# --- joining a cluster -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"name": "local", "address": "h:1"}, "--address only applies to --engine ray"),
    ({"name": "local", "token_file": "t"}, "--ray-token-file only applies to --engine ray"),
    ({"name": "local", "shard_size": 2}, "--shard-size only applies to --engine ray"),
    ({"name": "ray", "shard_size": 0}, "--shard-size must be a whole number of prompts, 1 or more"),
    ({"name": "dask"}, "unknown engine 'dask'; choose local or ray"),
])
def test_engine_flags_that_do_not_fit_are_one_line(kwargs, message):
    with pytest.raises(ClusterError, match=message):
        Engine(**kwargs)


def test_run_refuses_engine_flags_without_the_engine_before_loading_anything(capsys):
    code, _, err = invoke(["run", "--address", "127.0.0.1:6379", "--out", "unused"], capsys)
    assert code == 2 and err == "error: --address only applies to --engine ray\n"


class FakeRay(types.SimpleNamespace):
    """Stands in for the `ray` module: records what `init` saw of the authentication environment."""

    def __init__(self, fail: BaseException | None = None, said: str = ""):
        super().__init__(calls=[], fail=fail, said=said)

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.calls.append({"kwargs": kwargs, "mode": os.environ.get("RAY_AUTH_MODE"),
                           "token": os.environ.get("RAY_AUTH_TOKEN"), "path": os.environ.get("RAY_AUTH_TOKEN_PATH")})
        if self.said:
            os.write(2, self.said.encode())  # as Ray's C++ core warns while it retries
        if self.fail:
            raise self.fail


@pytest.fixture
def listening():
    """An address something listens at (for the TCP probe), and a clean authentication environment."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            mp.delenv(name, raising=False)
        yield mp, f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_a_token_found_where_ray_looks_turns_token_mode_on_for_an_address(listening, tmp_path):
    """Issue 40: `ray start --head` turned authentication on (it found ~/.ray/auth_token), but Ray does not send
    the token to an address given to ray.init, so the sweep failed with InvalidAuthToken. Now the token is used."""
    mp, address = listening
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc\n")
    mp.setenv("HOME", str(tmp_path))
    fake = FakeRay()
    mp.setattr(cluster, "import_ray", lambda: fake)
    lines = []
    assert cluster.connect(Engine("ray", address=address), echo=lines.append) is True
    assert fake.calls[0]["mode"] == "token" and fake.calls[0]["kwargs"]["address"] == address
    assert lines[-1] == f"ray: joined the cluster at {address} (token from ~/.ray/auth_token)"


def test_the_token_file_flag_wins_and_a_mode_set_by_the_user_is_kept(listening, tmp_path):
    mp, address = listening
    token = tmp_path / "token"
    token.write_text("secret")
    mp.setenv("RAY_AUTH_TOKEN", "from-the-environment")
    fake = FakeRay()
    mp.setattr(cluster, "import_ray", lambda: fake)
    cluster.connect(Engine("ray", address=address, token_file=str(token)))
    assert fake.calls[0] == {**fake.calls[0], "mode": "token", "token": None, "path": str(token.resolve())}
    mp.setenv("RAY_AUTH_MODE", "disabled")
    cluster.connect(Engine("ray", address=address, token_file=str(token)))
    assert fake.calls[1]["mode"] == "disabled"


@pytest.mark.parametrize("token, said, exc, message", [
    (None, "gcs_client.cc:210: Failed to get cluster ID from GCS server: Unauthenticated: RPC error: InvalidAuthToken",
     ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379"),
     "requires token authentication and no token was found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token): "
     "set RAY_AUTH_TOKEN to the cluster's token (on the head: `ray get-auth-token`), or pass --ray-token-file PATH"),
    ("abc", "Failed to get cluster ID from GCS server: Unauthenticated: RPC error: InvalidAuthToken",
     ConnectionError("Failed to connect to Ray cluster"), "refused the token from --ray-token-file"),
    (None, "", RuntimeError("Version mismatch: The cluster was started with: Ray: 2.9.0 Python: 3.10 This process on "
                            "node 10.0.0.2 was started with: Ray: 2.60.0"), "runs another Ray or Python version"),
    (None, "something else went wrong\n", ConnectionError("Failed to connect to Ray cluster at x"),
     "cannot join the Ray cluster at {address}: Failed to connect to Ray cluster at x; Ray said: something else went "
     "wrong; check the address"),
])
def test_every_failure_to_join_is_one_line_that_says_what_to_do(listening, tmp_path, capfd, token, said, exc, message):
    mp, address = listening
    mp.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    flag = None
    if token:
        flag = tmp_path / "token"
        flag.write_text(token)
    mp.setattr(cluster, "import_ray", lambda: FakeRay(fail=exc, said=said))
    with pytest.raises(ClusterError) as info:
        cluster.connect(Engine("ray", address=address, token_file=str(flag) if flag else None))
    text = str(info.value)
    assert "\n" not in text and message.format(address=address) in text
    assert said.strip() not in capfd.readouterr().err or not said  # Ray's warnings kept off the terminal


def test_nothing_listening_is_said_at_once(listening):
    mp, _ = listening
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    mp.setattr(cluster, "import_ray", lambda: FakeRay())
    started = time.monotonic()
    with pytest.raises(ClusterError, match=f"nothing answers at 127.0.0.1:{port} .*start the cluster's head there "
                                           f"\\(`ray start --head --port={port}`\\)"):
        cluster.connect(Engine("ray", address=f"127.0.0.1:{port}"))
    assert time.monotonic() - started < cluster.CONNECT_PROBE_S + 1


@pytest.mark.parametrize("content, message", [(None, "cannot read it"), ("  \n", "is empty")])
def test_a_token_file_that_cannot_be_used_is_one_line(tmp_path, content, message):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ClusterError, match=f"--ray-token-file {path}.*{message}"):
        cluster.use_token_file(path)


def test_the_token_is_looked_for_in_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cluster.token_source({}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    assert cluster.token_source({}) == "~/.ray/auth_token"
    assert cluster.token_source({"RAY_AUTH_TOKEN_PATH": "/x"}) == "RAY_AUTH_TOKEN_PATH (/x)"
    assert cluster.token_source({"RAY_AUTH_TOKEN": "t", "RAY_AUTH_TOKEN_PATH": "/x"}) == "RAY_AUTH_TOKEN"


def test_submit_and_verify_hand_the_engine_to_the_run(monkeypatch, capsys, tmp_path):
    """The flags reach the run as one Engine (the cluster test runs `submit --engine ray` for real)."""
    import invbench.submit as submit_module

    seen = {}

    def fake_submit(**kwargs):
        seen["submit"] = kwargs["engine"]
        return tmp_path / "entry.json"

    def fake_verify(entry, **kwargs):
        seen["verify"] = kwargs["engine"]
        return types.SimpleNamespace(format=lambda: "report", ok=True)

    monkeypatch.setattr(submit_module, "submit", fake_submit)
    monkeypatch.setattr(submit_module, "verify", fake_verify)
    token = tmp_path / "token"
    code, _, err = invoke(["submit", "--defense", "none", "--protocol", "quick", "--name", "x", "--engine", "ray",
                           "--address", "10.0.0.5:6379", "--ray-token-file", str(token), "--shard-size", "3"], capsys)
    assert code == 0, err
    assert seen["submit"] == Engine("ray", address="10.0.0.5:6379", token_file=str(token), shard_size=3)
    entry = tmp_path / "entry.json"
    entry.write_text("{}")
    code, _, err = invoke(["verify", str(entry), "--engine", "ray"], capsys)
    assert code == 0, err
    assert seen["verify"] == Engine("ray")
    code, _, err = invoke(["verify", str(entry), "--shard-size", "2"], capsys)
    assert code == 2 and err == "error: --shard-size only applies to --engine ray\n"
