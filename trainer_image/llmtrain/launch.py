"""One launcher per node: ``llmtrain train`` re-runs itself under torch.distributed.run.

A worker pod runs plain ``llmtrain train CONFIG`` with NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR
and MASTER_PORT set (no SSH, no hostfile). Without WORLD_SIZE in the environment the command becomes::

    python -m torch.distributed.run --nnodes=N --node_rank=I --nproc_per_node=P \\
        --master_addr=A --master_port=PORT --max_restarts=0 -m llmtrain.cli train CONFIG

torchrun exits 1 whatever its workers returned, so the workers' rank 0 writes why it stopped into
LLMTRAIN_STATUS_FILE, and this launcher turns "preempted" back into exit code 75. SIGTERM/SIGINT sent
to the launcher (the pod's PID 1) are forwarded to torchrun, which forwards them to the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from llmop_contract.protocol import Env, ExitCode


def wants_launcher(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    return "WORLD_SIZE" not in environ and ("NNODES" in environ or "NPROC_PER_NODE" in environ)


def torchrun_command(config: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={environ.get('NNODES', '1')}",
        f"--node_rank={environ.get('NODE_RANK', '0')}",
        f"--nproc_per_node={environ.get('NPROC_PER_NODE', '1')}",
        f"--master_addr={environ.get('MASTER_ADDR', '127.0.0.1')}",
        f"--master_port={environ.get('MASTER_PORT', '29500')}",
        # The operator restarts the whole gang (and counts it); torchrun must not retry on its own.
        "--max_restarts=0",
        "-m",
        "llmtrain.cli",
        "train",
        config,
    ]


def launch(config: str) -> int:
    with tempfile.TemporaryDirectory(prefix="llmtrain-") as tmp:
        status = Path(tmp) / "status"
        env = {**os.environ, Env.STATUS_FILE: str(status)}
        child = subprocess.Popen(torchrun_command(config), env=env)

        def forward(signum: int, frame: FrameType | None) -> None:
            child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        code = child.wait()
        said = status.read_text() if status.is_file() else ""
        if said.startswith("preempted"):
            return ExitCode.PREEMPTED
        if said.startswith("refused"):  # a rank's ConfigError after start-up (train/remote.py)
            return ExitCode.BAD_CONFIG
        return code
