"""Background processes of a local stack (development runtime, operator), started and stopped together."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 3) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return str(r.read().decode())
    except OSError:
        return None


class Background:
    """One `llmop` subcommand in the background, its output in a log file."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log: Path, module: str = "llmop.cli"
    ) -> None:
        self.name, self.log = name, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_runtime(kubeconfig: Path, log: Path, nodes: int = 2, first_index: int = 0) -> Background:
    """The development runtime serving local-<first_index> .. local-<first_index + nodes - 1>.

    One runtime per node (nodes=1) lets a test stop a single node; started again with the same log,
    the runtime appends to it.
    """
    env = {"KUBECONFIG": str(kubeconfig)}
    seen = log.stat().st_size if log.exists() else 0  # this start's lines, not an earlier start's
    if (nodes, first_index) == (2, 0):
        rt = Background("runtime", ["dev", "runtime"], env, log)
    else:
        # `llmop dev runtime` forwards --kubeconfig and --nodes only: the runtime's own entry point.
        args = ["--nodes", str(nodes), "--first-index", str(first_index)]
        rt = Background("runtime", args, env, log, module="llmop_dev.runtime.main")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "serving nodes" in log.read_bytes()[seen:].decode(errors="replace"):
            return rt
        if not rt.alive():
            raise RuntimeError(f"the development runtime exited:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    rt.stop()
    raise TimeoutError("the development runtime did not start within 120 s")


def start_operator(kubeconfig: Path, namespace: str, log: Path) -> tuple[Background, int]:
    """The operator watching one namespace; returns it and its metrics port (health on another)."""
    metrics, health = free_port(), free_port()
    env = {
        "KUBECONFIG": str(kubeconfig),
        "LLMOP_NAMESPACES": namespace,
        "LLMOP_BIND_ADDRESS": "127.0.0.1",
        "LLMOP_METRICS_PORT": str(metrics),
        "LLMOP_HEALTH_PORT": str(health),
        "LLMOP_PROGRESS_INTERVAL": "2",
        "LLMOP_RESYNC_SECONDS": "5",
    }
    op = Background("operator", ["operator"], env, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if http_get(f"http://127.0.0.1:{health}/healthz") is not None:
            return op, metrics
        if not op.alive():
            raise RuntimeError(f"the operator exited:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    op.stop()
    raise TimeoutError("the operator did not become healthy within 120 s")
