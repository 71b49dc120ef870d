"""Run ``llmtrain serve`` as a child process on loopback and talk to it: for tests and benchmarks.

The child picks a free port (``--port 0``) and logs it; this module reads its log lines on a thread,
so callers learn the port, see every event, and the pipe never fills up.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from llmop_contract.protocol import Env


class ServerProcess:
    def __init__(self, model_dir: str | Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        child_env = {**os.environ, Env.LOG_FORMAT: "json", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmtrain.cli",
                "serve",
                "--model-dir",
                str(model_dir),
                "--port",
                "0",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        listening = self.wait_event("listening", timeout=60)
        self.host, self.port = str(listening["host"]), int(listening["port"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def events(self) -> list[dict[str, Any]]:
        with self._changed:
            return [json.loads(line) for line in self.lines if line.startswith('{"ts"')]

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        """The first log event called ``name``; raises if the process ends or time runs out first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [e for e in self.events() if e["event"] == name]
                if found:
                    return found[0]
                # After the exit, only once every line is read: the event may be in the last ones.
                ended = self.proc.poll() is not None and not self._reader.is_alive()
                if ended or time.monotonic() > deadline:
                    tail = "\n".join(self.lines[-30:])
                    raise RuntimeError(
                        f"llmtrain serve: no {name!r} event (exit {self.proc.poll()}):\n{tail}"
                    )
                self._changed.wait(0.1)

    def wait_ready(self, timeout: float = 120) -> None:
        self.wait_event("ready", timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request; ``body`` is sent as JSON unless it is already bytes."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            sent = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers={**sent, **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body)
        return status, json.loads(data)

    def wait(self, timeout: float = 60) -> int:
        """The exit code, once the process has exited and all its log lines are in ``lines``."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit code (SIGKILL if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
