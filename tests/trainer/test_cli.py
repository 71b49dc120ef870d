"""The llmtrain command line: config validation before any work, and the per-node launcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from llmtrain.launch import torchrun_command, wants_launcher
from llmtrain.testing import DEBUG_CONFIG
from tests.trainer.conftest import POISONED_TORCH, torchless_env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def write_bad(tmp_path: Path, mutate: dict[str, object]) -> Path:
    raw = yaml.safe_load(DEBUG_CONFIG.read_text())
    raw["spec"]["training"].update(mutate)
    raw["paths"]["checkpointDir"] = str(tmp_path / "checkpoints")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_debug_config_is_valid() -> None:
    from llmtrain.config import load_config

    cfg = load_config(DEBUG_CONFIG)
    assert cfg.spec.training.precision.value == "FP32"


def test_poisoned_torch_fails_any_command_that_imports_it(tmp_path: Path) -> None:
    # The control for the tests below: under torchless_env, importing torch really fails.
    proc = subprocess.run(
        [sys.executable, "-c", "import llmtrain.train.loop"],
        capture_output=True,
        text=True,
        timeout=120,
        env=torchless_env(tmp_path),
    )
    assert proc.returncode == 1 and POISONED_TORCH in proc.stderr, proc.stderr[-2000:]


def test_bad_field_exits_nonzero_naming_it_before_work(tmp_path: Path) -> None:
    path = write_bad(tmp_path, {"microBatchSize": 0})
    # Validation happens before torch/DeepSpeed are imported: importing torch would raise here.
    proc = run_cli("train", str(path), env=torchless_env(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "spec.training.microBatchSize" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing was started


def test_cross_field_rule_names_the_field(tmp_path: Path) -> None:
    path = write_bad(tmp_path, {"globalBatchSize": 12, "microBatchSize": 8})
    proc = run_cli("train", str(path), env=torchless_env(tmp_path))
    assert proc.returncode == 2
    assert "spec.training.globalBatchSize" in proc.stderr
    assert "multiple of training.microBatchSize" in proc.stderr


def test_unknown_field_and_missing_file(tmp_path: Path) -> None:
    path = write_bad(tmp_path, {"learningRate": 0.1})  # belongs under optimizer
    proc = run_cli("train", str(path), env=torchless_env(tmp_path))
    assert proc.returncode == 2 and "spec.training.learningRate" in proc.stderr
    proc = run_cli("prepare", str(tmp_path / "missing.yaml"), env=torchless_env(tmp_path))
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr


def test_launcher_only_without_world_size() -> None:
    assert wants_launcher({"NNODES": "2", "NPROC_PER_NODE": "4"})
    assert not wants_launcher({"NNODES": "2", "WORLD_SIZE": "8", "RANK": "0"})  # already under torchrun
    assert not wants_launcher({})
    node = {
        "NNODES": "2",
        "NODE_RANK": "1",
        "NPROC_PER_NODE": "4",
        "MASTER_ADDR": "j-worker-0.j-workers.team.svc",
        "MASTER_PORT": "29500",
        "LLMOP_NODE_ADDR": "j-worker-1.j-workers.team.svc",
        "LLMOP_JOB_NAMESPACE": "team",
        "LLMOP_JOB_NAME": "j",
        "LLMOP_ATTEMPT": "3",
    }
    cmd = torchrun_command("/etc/llmop/config.yaml", node)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    for arg in (
        "--nnodes=2",
        "--nproc_per_node=4",
        "--max_restarts=0",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=j-worker-0.j-workers.team.svc:29500",
        "--rdzv_id=team.j.3",  # a launcher of attempt 2 cannot join attempt 3's gang
        "--rdzv_conf=is_host=false,join_timeout=900",
        "--local_addr=j-worker-1.j-workers.team.svc",
    ):
        assert arg in cmd
    assert "--rdzv_conf=is_host=true,join_timeout=900" in torchrun_command("c", {**node, "NODE_RANK": "0"})
    assert cmd[-3:] == ["llmtrain.cli", "train", "/etc/llmop/config.yaml"]
