"""Checkpoint manifests: a damaged checkpoint is never loaded; the run falls back to the newest good one.

The unit tests check the verification itself on plain files; the runs check what a user sees when
the newest checkpoint is truncated (resume from the previous one, one WARNING line, the fallback on
/metrics and in the termination message) and when every checkpoint is damaged (start from scratch).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmop_contract.protocol import Metric
from llmtrain.testing import debug_config, license_documents, write_shards
from llmtrain.train.checkpoint import candidates, select, set_aside
from llmtrain.train.integrity import MANIFEST, verify, write_manifest
from tests.trainer.conftest import train_env
from tests.trainer.test_train_features import run_train, snapshot

# --- the manifest ----------------------------------------------------------------------------------


def fake_checkpoint(root: Path, step: int, size: int = 3 << 20) -> Path:
    """A directory shaped like a checkpoint: a multi-MiB states file (hashed over several chunks)."""
    directory = root / f"step-{step:08d}"
    (directory / "nested").mkdir(parents=True)
    (directory / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * (size // 256) + b"tail")
    (directory / "nested" / "rng-rank00000.pt").write_bytes(b"rng %d" % step)
    write_manifest(directory, step)
    return directory


def test_a_committed_checkpoint_verifies_and_lists_every_file(tmp_path: Path) -> None:
    directory = fake_checkpoint(tmp_path, 10)
    assert verify(directory) is None
    listed = json.loads((directory / MANIFEST).read_text())["files"]
    assert set(listed) == {"mp_rank_00_model_states.pt", "nested/rng-rank00000.pt"}
    assert listed["mp_rank_00_model_states.pt"]["size"] == (3 << 20) + 4
    assert not list(directory.glob(".*.tmp")), "the staged manifest was renamed into place"


def _truncate(d: Path) -> None:
    with open(d / "mp_rank_00_model_states.pt", "r+b") as fh:
        fh.truncate(1000)


def _flip_last_byte(d: Path) -> None:  # same size: only the checksum can tell
    with open(d / "mp_rank_00_model_states.pt", "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"X")


@pytest.mark.parametrize(
    ("damage", "reason", "file"),
    [
        (_truncate, "size mismatch", "mp_rank_00_model_states.pt"),
        (_flip_last_byte, "checksum mismatch", "mp_rank_00_model_states.pt"),
        (lambda d: (d / "nested" / "rng-rank00000.pt").unlink(), "missing file", "nested/rng-rank00000.pt"),
        (lambda d: (d / MANIFEST).unlink(), "missing manifest", MANIFEST),
        (lambda d: (d / MANIFEST).write_text('{"files": '), "unreadable manifest", MANIFEST),
        (lambda d: (d / MANIFEST).write_text('{"files": {}}'), "unreadable manifest", MANIFEST),
    ],
)
def test_damage_is_found_and_named(tmp_path: Path, damage: Any, reason: str, file: str) -> None:
    directory = fake_checkpoint(tmp_path, 10)
    damage(directory)
    problem = verify(directory)
    assert problem is not None and (problem.reason, problem.file) == (reason, file)
    assert str(directory) in str(problem) and reason in str(problem)


def test_a_file_the_manifest_does_not_list_is_not_damage(tmp_path: Path) -> None:
    directory = fake_checkpoint(tmp_path, 10)
    (directory / "notes.txt").write_text("added later by a person")
    assert verify(directory) is None


def test_select_takes_the_newest_that_verifies_and_set_aside_keeps_the_rest(tmp_path: Path) -> None:
    for step in (5, 10, 100):  # 100 after 10: numeric order, not only the zero-padded names
        fake_checkpoint(tmp_path, step)
    _truncate(tmp_path / "step-00000100")
    (tmp_path / "step-00000010" / MANIFEST).unlink()
    assert [p.name for p in candidates(tmp_path)] == ["step-00000100", "step-00000010", "step-00000005"]
    tag, rejected = select(tmp_path)
    assert tag == "step-00000005"
    assert [(r.checkpoint.name, r.reason) for r in rejected] == [
        ("step-00000100", "size mismatch"),
        ("step-00000010", "missing manifest"),
    ]
    moved = set_aside(rejected[0].checkpoint)
    assert moved.name == "rejected-step-00000100" and (moved / "mp_rank_00_model_states.pt").is_file()
    fake_checkpoint(tmp_path, 100)  # the same step saved again, damaged again: the first is kept
    assert set_aside(tmp_path / "step-00000100").name == "rejected-step-00000100.2"
    assert [p.name for p in candidates(tmp_path)] == ["step-00000010", "step-00000005"]


# --- real runs ---------------------------------------------------------------------------------------

SPEC = {"training": {"maxSteps": 30, "checkpointing": {"intervalSteps": 10, "keepLast": 3}}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"), license_documents()[:300])


def warnings(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("level") == "WARNING"]


def scrape_during_start(config: Path) -> tuple[int, dict[str, float], list[dict[str, Any]]]:
    """Run training, scrape /metrics once it has started, then SIGTERM it (it checkpoints, exits 75)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtrain.cli", "train", str(config)],
        stdout=subprocess.PIPE,
        text=True,
        env=train_env(),
    )
    lines: list[dict[str, Any]] = []
    reader = threading.Thread(
        target=lambda: lines.extend(json.loads(x) for x in proc.stdout or [] if x.startswith("{")),
        daemon=True,
    )
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any(r["event"] == "start" for r in list(lines)):
            assert time.monotonic() < deadline and proc.poll() is None, lines[-5:]
            time.sleep(0.05)
        values = snapshot(next(r["port"] for r in lines if r["event"] == "metrics_listening"))
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    reader.join(30)
    return proc.returncode, values, lines


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_then_all_damaged_starts_from_scratch(
    data_dir: Path, tmp_path: Path
) -> None:
    config = debug_config(tmp_path, data_dir, SPEC)
    ckpt = tmp_path / "checkpoints"
    rc, records, output = run_train(config)
    assert rc == 0, output[-3000:]
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000010", "step-00000020", "step-00000030"]
    assert all(verify(p) is None for p in ckpt.glob("step-*"))

    # 1. The newest checkpoint is truncated: the run resumes from the previous one and says so once.
    _truncate(ckpt / "step-00000030")
    longer = tmp_path / "longer.yaml"  # the same directories, more steps: still training when scraped
    raw = yaml.safe_load(config.read_text())
    raw["spec"]["training"]["maxSteps"] = 400
    longer.write_text(yaml.safe_dump(raw))
    rc, metrics, records = scrape_during_start(longer)
    assert rc == 75, records[-5:]
    start = next(r for r in records if r["event"] == "start")
    assert start["resumed_from"] == "step-00000020" and start["checkpoint_fallbacks"] == 1
    [warning] = warnings(records)
    assert warning["event"] == "checkpoint_rejected" and warning["checkpoint"] == "step-00000030"
    assert (warning["file"], warning["reason"]) == ("mp_rank_00_model_states.pt", "size mismatch")
    assert metrics[Metric.CHECKPOINT_FALLBACKS.value] == 1
    assert metrics[Metric.RESUMED_FROM_STEP.value] == 20
    # Kept for inspection, out of the way of rotation and of the next resume.
    kept = ckpt / "rejected-step-00000030"
    assert (kept / "mp_rank_00_model_states.pt").stat().st_size == 1000
    good = sorted(p.name for p in ckpt.glob("step-*"))
    assert len(good) == 3 and all(verify(ckpt / g) is None for g in good), good

    # 2. Every checkpoint is damaged: start from scratch, loudly; nothing is deleted.
    for directory in ckpt.glob("step-*"):
        _flip_last_byte(directory)
    termination = tmp_path / "termination-log"
    rc, records, output = run_train(config, LLMOP_TERMINATION_LOG=str(termination))
    assert rc == 0, output[-3000:]
    start = next(r for r in records if r["event"] == "start")
    assert start["resumed_from"] is None and start["checkpoint_fallbacks"] == 3
    rejected = warnings(records)
    assert [r["event"] for r in rejected] == ["checkpoint_rejected"] * 3 + ["checkpoint_none_valid"]
    assert {r["reason"] for r in rejected[:3]} == {"checksum mismatch"}
    assert any(r["event"] == "validation" and r["step"] == 0 for r in records)  # trained from step 0
    assert len(list(ckpt.glob("rejected-step-*"))) == 4
    message = json.loads(termination.read_text())
    assert (message["checkpointFallbacks"], message["resumedFromStep"], message["step"]) == (3, 0, 30)
