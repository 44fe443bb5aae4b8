"""A real Ray cluster on this machine (issue 40): a head and a second worker node started with `ray start`,
token authentication on, a sharded `quick` entry across them (`invbench submit --engine ray --address ...`)
with the worker node killed (SIGKILL: its raylet, its agents, its worker processes) while one of its shards
runs, compared with the entry made on one machine; and joining it without a token, with the wrong one, and as
the README's sweep command does with the token in ~/.ray/auth_token.

Every process a node starts is in its own process group or a child of its raylet: both are killed at the end
(never `ray stop`, which would stop other people's Ray on a shared machine). The addresses given are
127.0.0.1; Ray itself advertises a multi-node cluster at the machine's own address and listens on all its
interfaces (Ray 2.60 turns 127.0.0.1 into that address for any node that can join a cluster), so the token
is what keeps others out, as on a real cluster. About 1.5-2 minutes on a busy 2-core machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import invoke

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'invbench[ray]'")
RAY_CLI = Path(sys.executable).with_name("ray")
pytestmark = [pytest.mark.slow,  # two Ray nodes and a sharded entry: about 100 s; CI runs it (.ci/run)
              pytest.mark.skipif(not sys.platform.startswith("linux") or not RAY_CLI.exists(),
                                 reason="needs Linux (/proc) and the `ray` command beside this Python")]
REPO = Path(__file__).resolve().parents[1]
TIMING = {"seconds_per_token", "wall_seconds", "tokens_per_second", "device"}
ENTRY_OWN = {"name", "entry_id", "date"}  # what differs between two submissions of one run by design
SUBMIT = ["submit", "--defense", "gaussian", "--sigma", "0.5", "--protocol", "quick", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def family(root: int) -> list[int]:
    """`root` and every process below it (by parent id, from /proc): a node's raylet, agents and workers."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier and pid not in found]
        found += frontier
    return found


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a `ray start --block` node and everything it started (its process group, and its raylet's
    workers, which Ray starts in sessions of their own)."""
    for pid in family(node.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    node.wait(timeout=60)


def started(node: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if node.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"`ray start` did not start ({node.poll()}): {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)


@dataclass
class Cluster:
    address: str
    token: Path
    head: subprocess.Popen
    worker: subprocess.Popen
    env: dict


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node (one CPU each), token authentication on (RAY_AUTH_MODE=token, the token in a
    file of this test's own); killed at the end."""
    root = Path(tempfile.mkdtemp(prefix="ivr", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_AUTH_MODE",
                                                            "RAY_AUTH_TOKEN_PATH")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    node_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = free_port()
    common = ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats", "--block"]
    nodes = []
    try:
        for name, args in (("head", ["--head", f"--port={port}", "--include-dashboard=false"]),
                           ("worker", [f"--address=127.0.0.1:{port}"])):
            log = root / f"{name}.log"
            with open(log, "wb") as out:
                node = subprocess.Popen([str(RAY_CLI), "start", *args, *common, f"--temp-dir={root / name}",
                                         f"--dashboard-agent-listen-port={free_port()}"], env=node_env,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            nodes.append(node)
            started(node, log)
        yield Cluster(f"127.0.0.1:{port}", token, nodes[0], nodes[1], env)
    finally:
        for node in reversed(nodes):
            kill_node(node)
        shutil.rmtree(root, ignore_errors=True)


def strip(value, drop=TIMING):
    if isinstance(value, dict):
        return {k: strip(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [strip(v, drop) for v in value]
    return value


def close(found, expected, path=""):
    """Equal, floats to rounding: a shard of 2 prompts against one batch of 4 changes the last bits of losses."""
    if isinstance(expected, float):
        assert found == pytest.approx(expected, rel=1e-5, abs=1e-9), path
    elif isinstance(expected, dict):
        assert isinstance(found, dict) and found.keys() == expected.keys(), path
        for key in expected:
            close(found[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(found, list) and len(found) == len(expected), path
        for i, (f, e) in enumerate(zip(found, expected)):
            close(f, e, f"{path}[{i}]")
    else:
        assert found == expected, path


def cli(args, env, log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "invbench", *map(str, args)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def lines(log: Path) -> list[str]:
    """stderr without progress bars, notes and Ray's own node-death reports."""
    return [line for line in log.read_text(errors="replace").replace("\r", "\n").splitlines()
            if line.strip() and "%|" not in line and not line.startswith("note:")]


def test_a_sharded_entry_over_two_nodes_with_one_killed_equals_the_one_machine_entry(cluster, tmp_path, capsys):
    # Joining without the token, and with another one, run meanwhile: Ray retries for about 20 s before giving up.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    bare = {**cluster.env, "HOME": str(tmp_path)}  # no ~/.ray/auth_token, no RAY_AUTH_* variables
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-cluster-token")
    refused = {tmp_path / "no-token.log": ["sweep", "--defense", "gaussian", "--param", "sigma=0.1", "--engine", "ray",
                                           "--address", cluster.address, "--runs-dir", tmp_path / "unused"],
               tmp_path / "wrong-token.log": ["run", "--model", "tiny-gpt2", "--n", "1", "--tokens", "1", "--device",
                                              "cpu", "--engine", "ray", "--address", cluster.address,
                                              "--ray-token-file", wrong, "--out", tmp_path / "unused"]}
    refused = {log_: cli(args, bare, log_) for log_, args in refused.items()}

    # The sharded entry, its token given by the flag (RAY_AUTH_MODE is not set: invbench turns it on).
    runs, boards = tmp_path / "sharded-runs", tmp_path / "sharded-boards"
    log = tmp_path / "sharded.log"
    began = time.monotonic()
    driver = cli([*SUBMIT, "--name", "sharded", "--engine", "ray", "--address", cluster.address, "--ray-token-file",
                  cluster.token, "--runs-dir", runs, "--board-dir", boards], cluster.env, log)
    raylet = next(pid for pid in family(cluster.worker.pid) if "raylet/raylet" in title(pid))
    killed = None
    while killed is None and driver.poll() is None and time.monotonic() - began < 600:
        if any("ray::attack_shard" in title(pid) for pid in family(raylet)[1:]):
            kill_node(cluster.worker)  # a shard of the entry is running there
            killed = time.monotonic() - began
        time.sleep(0.1)
    assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert killed is not None, "no shard ran on the worker node before the run ended"
    assert not [line for line in lines(log) if line.startswith("error")], log.read_text()[-3000:]
    said = " ".join(lines(log))
    assert f"ray: joined the cluster at {cluster.address} (token from --ray-token-file {cluster.token})" in said
    assert "sharded: 8 shard(s) of at most 2 prompt(s) over 2 CPUs" in said

    # The same entry made on one machine.
    code, _, err = invoke([*SUBMIT, "--name", "one machine", "--runs-dir", tmp_path / "runs", "--board-dir",
                           tmp_path / "boards"], capsys)
    assert code == 0, err
    sharded = json.loads((boards / "quick" / "sharded.json").read_text())
    alone = json.loads((tmp_path / "boards" / "quick" / "one-machine.json").read_text())
    assert strip(sharded, TIMING | ENTRY_OWN) == strip(alone, TIMING | ENTRY_OWN)  # summary, verdicts, transcript
    assert sharded["summary"]["device"].startswith("ray: 2 CPUs on 2 nodes; driver cpu")
    records = [json.loads(line) for line in (runs / "quick" / "sharded" / "records.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "runs" / "quick" / "one-machine" / "records.jsonl")
                 .read_text().splitlines()]
    close(strip(records), strip(reference))  # the same records, in the same order (attack, then prompt)

    # The README's sweep command, as a user runs it after `ray start --head`: the token in ~/.ray/auth_token.
    (home / ".ray" / "auth_token").write_text(cluster.token.read_text())
    joined = subprocess.run([sys.executable, "-c", "from invbench.sweep import _run_ray; import sys; "
                             f"_run_ray([], address={cluster.address!r}, echo=print)"],
                            env={**cluster.env, "HOME": str(home)}, capture_output=True, text=True, timeout=300)
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert f"ray: joined the cluster at {cluster.address} (token from ~/.ray/auth_token)" in joined.stdout

    # Each refusal: one line that says what to do, none of Ray's retry warnings, no traceback.
    for (log_, proc), expected in zip(refused.items(), ("requires token authentication and no token was found",
                                                        "refused the token from --ray-token-file")):
        assert proc.wait(timeout=300) == 2, log_.read_text()[-2000:]
        errors = [line for line in lines(log_) if line.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith(f"error: the Ray cluster at {cluster.address} "), errors
        assert expected in errors[0] and "ray get-auth-token" in errors[0]
        assert "gcs_client" not in log_.read_text() and "Traceback" not in log_.read_text()
