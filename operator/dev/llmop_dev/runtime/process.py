"""Starting, signalling and reaping one container's process tree (see sandbox for the namespaces)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_runtime() -> None:
    # If the runtime itself dies (even by SIGKILL) its pods' processes must not run on unsupervised:
    # the kernel sends unshare SIGKILL, and --kill-child takes the pod's namespace down with it.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Container:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, apart from the runtime's
                preexec_fn=_die_with_runtime,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self) -> int | None:
        """The container's exit code once it ended (128+N when killed by signal N, as runtimes report)."""
        code = self.proc.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code

    def init_pid(self) -> int | None:
        """Host PID of the container's PID 1 (unshare's only child)."""
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def terminate(self) -> None:
        """SIGTERM to the container's PID 1 only, as a container runtime sends it."""
        pid = self.init_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL unshare: --kill-child kills PID 1, and with it every process of the namespace."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
