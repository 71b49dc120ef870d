"""Real multi-process DeepSpeed training on CPU (gloo): convergence, crash/resume, preemption.

Every run here is `llmtrain train` under torchrun (or under its own per-node launcher) with two ranks,
on the bundled English corpus prepared by `llmtrain prepare`. Logs are JSON lines, parsed for the assertions.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from llmtrain.testing import debug_config
from llmtrain.train.checkpoint import latest_tag
from llmtrain.train.dist import free_port
from tests.trainer.ranks import TORCHRUN, TRAIN, env, events, torchrun

pytestmark = pytest.mark.slow


def two_rank_spec(steps: int, zero: int, **training: Any) -> dict[str, Any]:
    return {
        "training": {
            "maxSteps": steps,
            "microBatchSize": 4,
            "globalBatchSize": 16,  # 2 ranks x 4 x accumulation 2
            "lrSchedule": {"warmupSteps": 10},
            **training,
        },
        "deepspeed": {
            "zeroStage": zero,
            "communication": {"reduceBucketSize": 50_000, "allgatherBucketSize": 50_000},
        },
        "workers": {"procsPerNode": 2},
    }


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_validation_loss_falls(zero: int, english_data: Path, tmp_path: Path) -> None:
    config = debug_config(tmp_path, english_data, two_rank_spec(150, zero, evaluation={"intervalSteps": 50}))
    log = tmp_path / "train.log"
    started = time.monotonic()
    assert torchrun(config, log) == 0, log.read_text()[-3000:]
    val = [e["validation_loss"] for e in events(log, "validation")]
    print(f"ZeRO-{zero}: validation loss {val} in {time.monotonic() - started:.1f}s")
    assert len(val) == 4  # step 0, 50, 100, 150
    assert val[-1] < 0.75 * val[0]
    assert val == sorted(val, reverse=True)
    start = events(log, "start")[0]
    assert start["zero_stage"] == zero and start["world_size"] == 2 and start["gradient_accumulation"] == 2
    assert (tmp_path / "output" / "model" / "model.safetensors").is_file()


def wait_until(
    what: str, condition: Callable[[], bool], proc: subprocess.Popen[Any], timeout: float = 300
) -> None:
    """Poll until ``condition()`` holds while ``proc`` runs; fail naming ``what`` if it ends or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"not reached within {timeout:.0f} s: {what}"
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) right after {what}"


def losses_by_step(log: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events(log, "progress")}


def test_kill9_resume_matches_uninterrupted_run(english_data: Path, tmp_path: Path) -> None:
    spec = two_rank_spec(80, 2, logIntervalSteps=1, checkpointing={"intervalSteps": 10, "keepLast": 2})
    spec["training"]["evaluation"] = {"intervalSteps": 1000, "maxBatches": 2}
    reference_log = tmp_path / "reference.log"
    assert torchrun(debug_config(tmp_path / "ref", english_data, spec), reference_log) == 0
    reference = losses_by_step(reference_log)
    assert sorted(reference) == list(range(1, 81))

    work = tmp_path / "crash"
    config = debug_config(work, english_data, spec)
    ckpt = work / "checkpoints"
    log = work / "train.log"
    cmd = [*TORCHRUN, f"--master_port={free_port()}", *TRAIN, str(config)]
    with log.open("w") as out:
        agent = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env())
        # Kill a few steps past the step-20 checkpoint, so the resumed run must redo lost work.
        wait_until(
            "the step-20 checkpoint and step 24",
            lambda: (latest_tag(ckpt) or "") >= "step-00000020" and max(losses_by_step(log), default=0) >= 24,
            agent,
        )
        workers = psutil.Process(agent.pid).children()
        assert agent.poll() is None and len(workers) == 2, "run ended before it could be killed"
        workers[1].send_signal(signal.SIGKILL)
        assert agent.wait(timeout=60) != 0
    killed_at = max(losses_by_step(log))
    assert killed_at < 80, "the kill landed after the last step"

    assert torchrun(config, log) == 0, log.read_text()[-3000:]
    start = events(log, "start")[-1]
    resumed = int(start["resumed_from"].removeprefix("step-"))
    assert 20 <= resumed <= killed_at and resumed % 10 == 0
    after = losses_by_step_from(log, start)
    assert sorted(after) == list(range(resumed + 1, 81))
    diffs = [abs(after[s] - reference[s]) for s in after]
    rel = max(d / abs(reference[s]) for d, s in zip(diffs, after, strict=True))
    print(
        f"resumed from step {resumed} (killed at ~{killed_at}); {len(after)} steps; max |dloss| {max(diffs):.3g}"
    )
    assert rel < 1e-5


def losses_by_step_from(log: Path, start: dict[str, Any]) -> dict[int, float]:
    """Progress losses logged after the given start event (the resumed run)."""
    out: dict[int, float] = {}
    seen = False
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        seen = seen or record == start
        if seen and record.get("event") == "progress":
            out[record["step"]] = record["loss"]
    return out


def test_sigterm_checkpoints_exits_75_and_resumes(english_data: Path, tmp_path: Path) -> None:
    spec = two_rank_spec(400, 2, logIntervalSteps=1, checkpointing={"intervalSteps": 1000})
    config = debug_config(tmp_path, english_data, spec)
    log = tmp_path / "train.log"
    # The pod form: one launcher per node, no WORLD_SIZE; it re-runs itself under torch.distributed.run.
    node_env = env(
        NNODES="1", NODE_RANK="0", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    with log.open("w") as out:
        launcher = subprocess.Popen(
            [sys.executable, *TRAIN, str(config)], stdout=out, stderr=subprocess.STDOUT, env=node_env
        )
        wait_until("a first training step", lambda: bool(events(log, "progress")), launcher)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=90) == 75, log.read_text()[-3000:]
    preempted = events(log, "preempted")
    assert len(preempted) == 1
    step = preempted[0]["step"]
    assert 0 < step < 400
    assert latest_tag(tmp_path / "checkpoints") == f"step-{step:08d}"

    spec["training"]["maxSteps"] = step + 5  # finish shortly after the preemption point
    # A loaded machine may preempt within warmup: a warmup past maxSteps is refused (admission rule).
    spec["training"]["lrSchedule"]["warmupSteps"] = min(10, step + 5)
    config = debug_config(tmp_path, english_data, spec)
    with log.open("a") as out:
        rc = subprocess.run(
            [sys.executable, *TRAIN, str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=node_env,
            timeout=180,
        ).returncode
    assert rc == 0, log.read_text()[-3000:]
    assert events(log, "start")[-1]["resumed_from"] == f"step-{step:08d}"
    assert events(log, "done")[-1]["step"] == step + 5


def test_two_node_launchers_rendezvous_per_attempt_worker_zero_is_rank_zero(
    english_data: Path, tmp_path: Path
) -> None:
    """The pod form on two nodes through torchrun's c10d rendezvous: worker 1 starts first, a launcher
    left over from attempt 0 waits on the same endpoint, and attempt 1's gang still forms with
    exactly its two nodes, worker 0 (the node the operator scrapes) as rank 0."""
    spec = two_rank_spec(6, 2, lrSchedule={"warmupSteps": 2})
    spec["workers"] = {"numNodes": 2, "procsPerNode": 1}
    config = debug_config(tmp_path, english_data, spec)
    port = str(free_port())

    def node(index: int, attempt: int, log: Path) -> subprocess.Popen[bytes]:
        node_env = env(
            NNODES="2",
            NODE_RANK=str(index),
            NPROC_PER_NODE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            LLMOP_NODE_ADDR=f"127.0.0.{index + 1}",
            LLMOP_JOB_NAMESPACE="default",
            LLMOP_JOB_NAME="gang",
            LLMOP_ATTEMPT=str(attempt),
        )
        with log.open("w") as out:
            return subprocess.Popen(
                [sys.executable, *TRAIN, str(config)], stdout=out, stderr=subprocess.STDOUT, env=node_env
            )

    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    stale = node(1, 0, tmp_path / "stale.log")
    worker1 = node(1, 1, logs[1])
    time.sleep(3)
    worker0 = node(0, 1, logs[0])
    try:
        assert worker0.wait(timeout=240) == 0, logs[0].read_text()[-3000:]
        assert worker1.wait(timeout=60) == 0, logs[1].read_text()[-3000:]
        assert stale.poll() is None or stale.returncode != 0  # it never trained with attempt 1's gang
    finally:
        for proc in (stale, worker0, worker1):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    start = events(logs[0], "start")
    assert len(start) == 1 and start[0]["world_size"] == 2, logs[0].read_text()[-3000:]
    assert events(logs[0], "done")[-1]["step"] == 6
    assert not events(logs[1], "start")  # rank 0 logs the run's events; worker 1's node holds rank 1
    assert not events(tmp_path / "stale.log", "start")
