"""One launcher per node: ``llmtrain train`` re-runs itself under torch.distributed.run.

A worker pod runs plain ``llmtrain train CONFIG`` with NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR,
MASTER_PORT and LLMOP_NODE_ADDR set (no SSH, no hostfile). Without WORLD_SIZE in the environment the
command becomes::

    python -m torch.distributed.run --nnodes=N --nproc_per_node=P --max_restarts=0 \\
        --rdzv_backend=c10d --rdzv_endpoint=MASTER_ADDR:MASTER_PORT --rdzv_id=NS.JOB.ATTEMPT \\
        --rdzv_conf=is_host=<NODE_RANK is 0>,join_timeout=S --local_addr=LLMOP_NODE_ADDR \\
        -m llmtrain.cli train CONFIG

Why c10d and not the static rendezvous: the rendezvous is named per attempt, so a launcher left over
from an earlier attempt (a pod still terminating on a lost node) cannot join the next gang; the gang
forms whatever order the pods start in, and waits ``join_timeout`` for late ones. The store lives in
worker 0's launcher (``is_host``, on the headless Service's name), and the nodes are ranked by their
``--local_addr``, sorted: worker 0's name sorts first, so it is group rank 0 whatever the arrival
order (the operator scrapes rank 0 on worker 0). The operator re-forms the gang at another size
itself (an elastic resize is a new attempt), so ``--nnodes`` is the attempt's fixed size and torchrun
never restarts on its own.

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


# How long a gang's launchers wait for all of its nodes: pods of one gang are created together and
# released together by the gang gate, so minutes cover image pulls on a slow node.
JOIN_TIMEOUT_SECONDS = 900


def rendezvous_id(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """One rendezvous per job and attempt (``<namespace>.<job>.<attempt>``)."""
    parts = (environ.get(Env.JOB_NAMESPACE), environ.get(Env.JOB_NAME), environ.get(Env.ATTEMPT, "0"))
    return ".".join(p for p in parts if p) or "llmtrain"


def torchrun_command(config: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> list[str]:
    endpoint = f"{environ.get('MASTER_ADDR', '127.0.0.1')}:{environ.get('MASTER_PORT', '29500')}"
    is_host = "true" if environ.get("NODE_RANK", "0") == "0" else "false"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={environ.get('NNODES', '1')}",
        f"--nproc_per_node={environ.get('NPROC_PER_NODE', '1')}",
        # The operator restarts the whole gang (and counts it); torchrun must not retry on its own.
        "--max_restarts=0",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={rendezvous_id(environ)}",
        f"--rdzv_conf=is_host={is_host},join_timeout={JOIN_TIMEOUT_SECONDS}",
    ]
    if addr := environ.get(Env.NODE_ADDR):
        # Without it every node is named by the machine's FQDN (one name for all the development
        # runtime's pods) and ranks fall to process ids.
        cmd.append(f"--local_addr={addr}")
    return [*cmd, "-m", "llmtrain.cli", "train", config]


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
