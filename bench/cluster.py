"""Ray for invbench: joining a cluster (or starting a local instance), its token, and one-line errors.

`invbench run|submit|verify|sweep --engine ray [--address HOST:PORT] [--ray-token-file PATH]` all come
through `connect`. What it does about Ray's token authentication (Ray 2.52 and later; Ray 2.59 turns it
on by default for clusters started by `ray.init()`, and `ray start --head` turns it on whenever it finds a
token, e.g. the ~/.ray/auth_token an earlier `ray.init()` wrote):

- the token is Ray's own, found where Ray documents it (docs.ray.io, "Ray token authentication"), first
  found first: `--ray-token-file PATH` (given to Ray as RAY_AUTH_TOKEN_PATH), RAY_AUTH_TOKEN (the token
  itself), RAY_AUTH_TOKEN_PATH (a file holding it), ~/.ray/auth_token (what `ray get-auth-token
  --generate` writes; on the head, `ray get-auth-token` prints it). A token is never a command-line value:
  it would show in `ps` and in shell histories;
- Ray enables token mode for a driver that finds its local cluster by itself, but not for one given an
  address (`ray.init(address=...)`), which then fails with `InvalidAuthToken` after about 20 seconds of
  warnings (issue 40). When a token is found and RAY_AUTH_MODE is not set, `connect` sets
  RAY_AUTH_MODE=token for this process (a cluster without authentication accepts a driver that sends a
  token: checked with Ray 2.60); RAY_AUTH_MODE set by the user is left as it is;
- every failure to connect is one ClusterError line that says what to do: Ray missing, nothing listening
  at the address (checked with a plain TCP connection first, in 3 s, where Ray would wait over a minute),
  no token, a token refused, another Ray version, anything else Ray says. Ray's own warnings while it
  tries are kept off the terminal (they are read for the cause) and shown when the connection succeeds.

This module imports no torch and no Ray at import time: the command line reads it for `--help`.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InvbenchError, one_line

ENGINES = ("local", "ray")
MODE_ENV, TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
CONNECT_PROBE_S = 3.0  # a TCP connection to the head's port; Ray itself retries for a minute and more
TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (on the head: `ray get-auth-token`), or pass "
              "--ray-token-file PATH to a file holding it")


class ClusterError(InvbenchError, ValueError):
    """Ray is missing, or its cluster cannot be started or reached; one line saying what to do."""


@dataclass(frozen=True)
class Engine:
    """How a run's attacks are executed: `local` (this process, one batch after another) or `ray` (each shard
    of prompts a Ray task, on the cluster at `address`, or on a local instance when it is None). Not part of
    the run's configuration: it changes where the work happens, not what the results are."""

    name: str = "local"
    address: str | None = None
    token_file: str | None = None
    shard_size: int | None = None  # prompts per Ray task (None: the prompts spread evenly, see `shard_size`)

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ClusterError(f"unknown engine {self.name!r}; choose {' or '.join(ENGINES)}")
        if self.name != "ray":
            given = [flag for flag, value in (("address", self.address), ("ray-token-file", self.token_file),
                                              ("shard-size", self.shard_size)) if value is not None]
            if given:
                raise ClusterError(f"--{given[0]} only applies to --engine ray")
        if self.shard_size is not None and (isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int)
                                            or self.shard_size < 1):
            raise ClusterError(f"--shard-size must be a whole number of prompts, 1 or more, got {self.shard_size!r}")

    @property
    def sharded(self) -> bool:
        return self.name == "ray"

    @property
    def where(self) -> str:
        return f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"


def shard_size(pending: int, *, slots: int, batch_size: int, asked: int | None = None) -> int:
    """Prompts per shard: `asked` (--shard-size), else the pending prompts spread evenly over the cluster's
    slots (GPUs, or CPUs without GPUs), at most one batch (--batch-size)."""
    if asked is not None:
        return asked
    return max(1, min(batch_size, math.ceil(pending / max(1, slots))))


# --- the token -----------------------------------------------------------------------------------

def token_source(environ: dict[str, str] | None = None) -> str | None:
    """Where Ray will take the token from, in Ray's order of precedence (never the token itself), or None."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV, "").strip():
        return TOKEN_ENV
    if env.get(TOKEN_PATH_ENV):
        return f"{TOKEN_PATH_ENV} ({env[TOKEN_PATH_ENV]})"
    default = DEFAULT_TOKEN_FILE.expanduser()
    if default.is_file() and default.stat().st_size > 0:
        return str(DEFAULT_TOKEN_FILE)
    return None


def use_token_file(path: str | os.PathLike) -> str:
    """`--ray-token-file`: checked (a readable file that is not empty), then handed to Ray as RAY_AUTH_TOKEN_PATH
    for this process; a RAY_AUTH_TOKEN in the environment would take precedence in Ray, so the flag removes it
    here. Returns the absolute path."""
    file = Path(path).expanduser().resolve()
    try:
        empty = not file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ClusterError(f"--ray-token-file {path}: cannot read it ({reason}); give the file that holds the "
                           "cluster's token (on the head: `ray get-auth-token` prints it)") from None
    if empty:
        raise ClusterError(f"--ray-token-file {path} is empty; put the cluster's token in it (on the head: "
                           "`ray get-auth-token` prints it)")
    os.environ.pop(TOKEN_ENV, None)
    os.environ[TOKEN_PATH_ENV] = str(file)
    return str(file)


def _refresh_auth(ray: Any) -> None:
    """Make an already imported Ray read RAY_AUTH_MODE and the token again (its config and token are cached)."""
    if "ray._raylet" not in sys.modules:  # not loaded yet: it reads the environment as it loads
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:  # noqa: BLE001 - private API of some Ray versions; with none, the env set before import counts
        pass


# --- connecting ----------------------------------------------------------------------------------

def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ClusterError("--engine ray needs Ray: pip install 'invbench[ray]'") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of HOST:PORT (ray://HOST:PORT too), or None for `auto` and what is not one."""
    text = address.split("://", 1)[-1]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def probe(address: str) -> None:
    """Whether anything listens at `address`, in seconds (Ray's own attempts take over a minute to give up)."""
    parsed = _host_port(address)
    if address != "auto" and parsed is None:
        raise ClusterError(f"--address {address!r} is not HOST:PORT; give the address `ray start --head` printed "
                           "(e.g. 10.0.0.5:6379)")
    if parsed is None:
        return
    host, port = parsed
    try:
        with socket.create_connection((host, port), timeout=CONNECT_PROBE_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ClusterError(f"nothing answers at {address} ({reason}): start the cluster's head there "
                           f"(`ray start --head --port={port}`), or pass the address its `ray start` printed") from None


@contextmanager
def _stderr_kept() -> Iterator[list[str]]:
    """What Ray's C++ core and logging write to stderr (fd 2) meanwhile, kept in a list instead of shown."""
    kept: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding program): nothing to keep
        yield kept
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield kept
        finally:
            try:
                sys.stderr.flush()
            except ValueError:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept.append(sink.read().decode("utf-8", "replace"))


def failure(address: str, exc: BaseException, said: str, *, token: str | None) -> ClusterError:
    """The one line for a failed `ray.init(address=...)`: from Ray's exception and what it wrote meanwhile."""
    text = f"{said}\n{exc}"
    if "InvalidAuthToken" in text or "Unauthenticated" in text or "no authentication token was found" in text:
        if token is None or "no authentication token was found" in text:
            return ClusterError(f"the Ray cluster at {address} requires token authentication and no token was found "
                                f"(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, {DEFAULT_TOKEN_FILE}): {TOKEN_HELP}")
        return ClusterError(f"the Ray cluster at {address} refused the token from {token}: {TOKEN_HELP} (the "
                            "cluster's own, not another cluster's)")
    if "version mismatch" in text.lower() or "Version mismatch" in text:
        return ClusterError(f"the Ray cluster at {address} runs another Ray or Python version than this machine "
                            f"({one_line(exc, limit=200)}); install the cluster's versions here")
    detail = one_line(exc, limit=200) or type(exc).__name__
    last = [line for line in said.splitlines() if line.strip()]
    hint = f"; Ray said: {one_line(last[-1], limit=200)}" if last else ""
    return ClusterError(f"cannot join the Ray cluster at {address}: {detail}{hint}; check the address (`ray status` on "
                        "the head prints it) and that this machine runs the cluster's Ray version")


def connect(engine: Engine, *, echo: Callable[[str], None] = lambda line: None, log_to_driver: bool = False) -> bool:
    """Join the cluster at `engine.address`, or start a local instance; True when this call started (or joined)
    Ray, so the caller shuts it down (`session`). Ray already initialised in this process is used as it is.
    `log_to_driver`: the tasks' own prints shown here (a sweep's runs say what they do; a run's shards return
    their notes instead)."""
    if engine.token_file:
        use_token_file(engine.token_file)
    token = f"--ray-token-file {engine.token_file}" if engine.token_file else token_source()
    if engine.address and token is not None and MODE_ENV not in os.environ:
        os.environ[MODE_ENV] = "token"  # before Ray is imported, where it reads it
    ray = import_ray()
    if ray.is_initialized():
        return False
    if engine.address:
        _refresh_auth(ray)
        probe(engine.address)
        said = ""
        try:
            with _stderr_kept() as kept:
                ray.init(address=engine.address, log_to_driver=log_to_driver, logging_level="warning")
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, AuthenticationError ...
            said = "".join(kept)
            raise failure(engine.address, exc, said, token=token) from None
        for line in "".join(kept).splitlines():
            if line.strip():
                echo(line)
        echo(f"ray: joined the cluster at {engine.address}" + (f" (token from {token})" if token else ""))
        return True
    try:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=log_to_driver)
    except Exception as exc:  # noqa: BLE001
        raise ClusterError(f"cannot start a local Ray instance: {one_line(exc, limit=200)}") from None
    return True


@contextmanager
def session(engine: Engine, *, echo: Callable[[str], None] = lambda line: None,
            log_to_driver: bool = False) -> Iterator[Any]:
    """Ray, connected for the duration (`connect`), and shut down afterwards when this session started it."""
    started = connect(engine, echo=echo, log_to_driver=log_to_driver)
    ray = import_ray()
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def describe(ray: Any) -> dict[str, Any]:
    """The cluster in figures: nodes alive, CPUs, GPUs and their kinds (Ray's accelerator_type resources)."""
    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    kinds = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    return {"nodes": len(nodes), "cpus": int(resources.get("CPU", 0)), "gpus": int(resources.get("GPU", 0)),
            "gpu_kinds": kinds}
