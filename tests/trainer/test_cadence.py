"""checkpointing.automaticInterval: the trainer checkpoints at Daly's interval from its own timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmop_contract import interval
from llmop_contract.api.v1alpha1.training import Checkpointing
from llmtrain.testing import debug_config
from llmtrain.train.cadence import Cadence
from tests.trainer.test_train_features import data_dir, run_train  # noqa: F401 (the fixture)


def test_a_fixed_interval_is_every_n_steps_and_never_moves() -> None:
    c = Cadence(Checkpointing(interval_steps=5), devices=8)
    c.start(3)
    assert [s for s in range(1, 21) if c.due(s)] == [5, 10, 15, 20]
    assert c.saved(5, 30.0, 2.0) is None and c.due(10)


def test_the_automatic_interval_is_dalys_for_the_save_just_timed_and_the_devices() -> None:
    c = Cadence(Checkpointing(interval_steps=5, automatic_interval=True), devices=1024)
    c.start(3)  # resumed at step 3: the first checkpoint comes intervalSteps later
    assert next(s for s in range(1, 10) if c.due(s)) == 8
    steps = c.saved(8, save_seconds=30.0, step_seconds=2.0)
    # 1024 GPUs at Llama 3's rate: one interruption per 44.5 h; a 30 s save -> about 51 min.
    want = interval.interval_steps(30.0, 2.0, interval.mean_time_between_interruptions(1024))
    assert steps == want and 1400 < want < 1700
    assert not c.due(8 + want - 1) and c.due(8 + want)
    # A slower save pushes the next one further; more devices (interruptions more often) pull it in.
    slower = Cadence(Checkpointing(automatic_interval=True), devices=1024).saved(0, 120.0, 2.0)
    bigger = Cadence(Checkpointing(automatic_interval=True), devices=16384).saved(0, 30.0, 2.0)
    assert slower is not None and bigger is not None and slower > want > bigger


@pytest.mark.slow
def test_a_run_with_the_automatic_interval_checkpoints_where_it_says(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    spec = {"training": {"maxSteps": 20, "checkpointing": {"intervalSteps": 4, "automaticInterval": True}}}
    rc, records, output = run_train(debug_config(tmp_path, data_dir, spec))
    assert rc == 0, output[-3000:]
    saved = [r["step"] for r in records if r["event"] == "checkpoint"]
    [first, *_] = [r for r in records if r["event"] == "checkpoint_interval"]
    assert first["step"] == 4 and first["next_in_steps"] >= 1
    # One process on CPU: an interruption every 45,570 h, so Daly's interval runs far past step 20 and
    # the next checkpoint is the final one; with the fixed interval of 4 there would be 5.
    assert first["next_in_steps"] > 16 and saved == [4, 20]
