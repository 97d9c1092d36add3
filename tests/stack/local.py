"""The compose stack as local processes: one cached venv per image, compose's own environment and
commands translated to loopback, processes stopped by PID.

No Docker daemon is needed: each service runs the entrypoint script or command that its image
runs, from a venv holding exactly the packages its image installs (the same pinned file), with
the environment compose would give it, after `${VAR}` interpolation from a generated `.env` and a
few translations that a container network makes implicit (service names to 127.0.0.1 and free
ports, /data and the artifact volume to folders of this run, the image's code folder to this
checkout).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unet-pipeline" / "stack"


# ---------------------------------------------------------------------------------------------
# Venvs per image, cached by the hash of the requirements file they install


def image_venv(name: str, requirements: Path, log: Path) -> Path:
    """A venv with exactly `requirements` installed (as the image's `pip install -r`), cached.

    The cache key is the file's content and the Python version, so a changed lock makes a new
    venv (and the older one of that name is removed); a venv whose install did not finish has no
    marker and is rebuilt.
    """
    digest = hashlib.sha256(requirements.read_bytes() + sys.version.encode()).hexdigest()[:16]
    venv = CACHE / f"{name}-{digest}"
    marker = venv / ".complete"
    if marker.is_file():
        return venv
    if venv.exists():
        subprocess.run(["rm", "-rf", str(venv)], check=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    # Nothing of this process's Python set-up (PYTHONPATH would show the checkout to pip check).
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    with open(log, "ab") as fh:
        for argv in (
            [sys.executable, "-m", "venv", str(venv)],
            # (pip's index settings are the machine's own: torch's CPU build comes from them)
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-r", str(requirements)],
            [str(venv / "bin" / "python"), "-m", "pip", "check"],
        ):
            done = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=requirements.parent, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"building the {name} venv failed ({' '.join(argv[:4])}...): see {log}")
    marker.touch()
    # Venvs of older versions of the same file are dead weight (over a GB each with torch).
    for stale in CACHE.glob(f"{name}-*"):
        if stale != venv and (stale / ".complete").is_file():
            subprocess.run(["rm", "-rf", str(stale)], check=False)
    return venv


def torch_build(venv: Path) -> str:
    """The torch version a venv holds, from its metadata (without importing torch)."""
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


# ---------------------------------------------------------------------------------------------
# compose: interpolation and the service definitions

_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?:(:\?|:-)([^}]*))?\}")


def interpolate(value, env: Mapping[str, str]):
    """compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}` over strings, lists and dicts."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, arg = match.groups()
        current = env.get(name, "")
        if op == ":?" and not current:
            raise KeyError(f"compose would refuse to start: {name} is unset ({arg})")
        return current or (arg if op == ":-" else "")

    return _VAR.sub(one, value)


def load_compose(env: Mapping[str, str], *overlays: str) -> dict:
    """deploy/docker-compose.yml (merged with overlays, service environments only), interpolated."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for overlay in overlays:
        extra = yaml.safe_load((DEPLOY / overlay).read_text())
        for name, service in extra["services"].items():
            compose["services"][name].setdefault("environment", {}).update(service.get("environment", {}))
    return interpolate(compose, env)


class Translation:
    """What a container network makes implicit, made explicit for loopback processes."""

    def __init__(self, hosts: Mapping[str, int], paths: Mapping[str, Path]) -> None:
        self.hosts = dict(hosts)  # compose service name -> local port (its container port is mapped)
        self.paths = {k: str(v) for k, v in paths.items()}  # container path -> local folder

    def value(self, value: str) -> str:
        for host, port in self.hosts.items():
            # host:port anywhere (URLs, MLflow's allowed Host headers), not inside longer names
            value = re.sub(rf"(?<![\w.-]){re.escape(host)}:\d+", f"127.0.0.1:{port}", value)
        if value in self.hosts:  # a bare host name (MLFLOW_DB_HOST: postgres)
            return "127.0.0.1"
        for container, local in self.paths.items():
            if value == container or value.startswith(container + "/"):
                return local + value[len(container) :]
        return value

    def env(self, environment: Mapping[str, str]) -> dict[str, str]:
        return {k: self.value(str(v)) for k, v in environment.items()}


def listen_args(argv: list[str], port: int) -> list[str]:
    """A server's `--host 0.0.0.0 --port N` made loopback on `port`."""
    out = list(argv)
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        if flag in out:
            out[out.index(flag) + 1] = value
    return out


def healthcheck_argv(service: dict, venv: Path, port: int) -> list[str]:
    """A service's compose healthcheck command, run with the venv's python against `port`."""
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD", f"healthcheck must be exec form, got {test}"
    argv = [re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", part) for part in test[1:]]
    if argv[0] == "python":
        argv[0] = str(venv / "bin" / "python")
    return argv


# ---------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(venv: Path, home: Path) -> dict[str, str]:
    """A clean environment: none of this shell's Prefect/MLflow/AWS settings, the venv first on PATH."""
    keep = ("PATH", "LANG", "LC_ALL", "TZ", "PIP_", "SSL_CERT", "REQUESTS_CA_BUNDLE")
    env = {k: v for k, v in os.environ.items() if k.startswith(keep)}
    home.mkdir(parents=True, exist_ok=True)
    return env | {
        "HOME": str(home),
        "PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        "VIRTUAL_ENV": str(venv),
        "PYTHONUNBUFFERED": "1",
    }


def _family(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Process:
    """A service process with its own log; stopped with its whole tree, by PID."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log: Path, cwd: Path = REPO):
        self.name, self.argv, self.env, self.log, self.cwd = name, argv, dict(env), log, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_until(self, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} was not healthy after {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.5)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process and all its descendants (flow runs, server workers), then SIGKILL."""
        if self.proc is None:
            return
        family = _family(self.proc.pid)
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=grace_s)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None

    def tail(self, n: int = 60) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def run(name: str, argv: list[str], env: Mapping[str, str], log: Path, timeout_s: float, cwd: Path = REPO):
    """A one-shot command (init, prefect deploy, a deployment run): its output, or an error with it."""
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n".encode())
    proc = Process(name, argv, env, log, cwd).start()
    try:
        code = proc.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise RuntimeError(f"{name} did not finish in {timeout_s:.0f} s:\n{proc.tail()}") from None
    if code != 0:
        raise RuntimeError(f"{name} exited with {code}:\n{proc.tail()}")
    return log.read_text(errors="replace")


def healthy(argv: list[str]) -> bool:
    """Whether a healthcheck command succeeds (exit 0 within its timeout)."""
    try:
        return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False
