"""A checkpoint resumed under another tensor size, through the real trainer on 2 CPU ranks (gloo).

Run A trains under tensor=2 (DeepSpeed AutoTP), run B under pure data parallel, from the same seed
and data (test_parallel_tensor: the two curves agree to ~1e-7). A's mid-run checkpoint resumed under
data parallel, and B's under tensor=2, go through DeepSpeed's universal checkpoint (``ds_to_universal``
merges the tensor slices by AutoTP's saved metadata, the ZeRO-1 loader cuts the running rank's slice)
and must continue the uninterrupted curves within 1e-4: in FP32 the meshes differ only in summation
order. A wrong slice is far outside that: handing each rank the other rank's half of the MLP down
projections moved the first resumed loss by 6.5e-3, and the same swap in the Adam moments alone by
up to 1e-3 within 6 steps (measured by patching DeepSpeed's ``_resolve_autotp_partition``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llmtrain.config import ConfigError
from llmtrain.testing import debug_config
from llmtrain.train.checkpoint import check_mesh, saved_mesh, tag_for
from tests.trainer.ranks import events, torchrun
from tests.trainer.test_parallel_tensor import TOLERANCE, curve, spec

STEPS = 30
SAVED_AT = 15
TP2: dict[str, int] = {"tensor": 2}
DP: dict[str, int] = {}


def config(work: Path, data: Path, mesh: dict[str, int]) -> Path:
    checkpointing = {"intervalSteps": SAVED_AT, "keepLast": 3}
    return debug_config(work, data, spec(mesh, steps=STEPS, checkpointing=checkpointing))


def train(work: Path, data: Path, mesh: dict[str, int]) -> Path:
    log = work / "train.log"
    assert torchrun(config(work, data, mesh), log) == 0, log.read_text()[-4000:]
    return log


def resume(source: Path, work: Path, data: Path, mesh: dict[str, int]) -> Path:
    """``source``'s step-SAVED_AT checkpoint alone (its manifest verifies as copied), run under ``mesh``."""
    tag = tag_for(SAVED_AT)
    shutil.copytree(source / "checkpoints" / tag, work / "checkpoints" / tag)
    return train(work, data, mesh)


def relative(a: dict[int, float], b: dict[int, float], steps: range) -> float:
    return max(abs(a[s] - b[s]) / b[s] for s in steps)


@pytest.mark.slow
def test_a_checkpoint_resumes_under_another_tensor_size_on_the_same_curve(
    english_data: Path, tmp_path: Path
) -> None:
    a_log = train(tmp_path / "tp", english_data, TP2)
    b_log = train(tmp_path / "dp", english_data, DP)
    a, b = curve(a_log), curve(b_log)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert relative(a, b, range(1, STEPS + 1)) < TOLERANCE, "the two references agree"
    assert saved_mesh(tmp_path / "tp" / "checkpoints" / tag_for(SAVED_AT)) == (2, 1)

    resumed_steps = range(SAVED_AT + 1, STEPS + 1)
    cases = (
        ("tp-under-dp", tmp_path / "tp", DP, "data=2 x tensor=1", (2, 1), (1, 1)),
        ("dp-under-tp", tmp_path / "dp", TP2, "data=1 x tensor=2", (1, 1), (2, 1)),
    )
    for name, source, mesh, described, saved, running in cases:
        work = tmp_path / name
        log = resume(source, work, english_data, mesh)
        start = events(log, "start")[0]
        assert start["resumed_from"] == tag_for(SAVED_AT) and start["mesh"] == described
        (resharded,) = events(log, "checkpoint_resharded")
        assert resharded["saved_mesh"] == f"tensor={saved[0]} pipeline={saved[1]}"
        assert resharded["mesh"] == f"tensor={running[0]} pipeline={running[1]}"
        assert resharded["saved_ranks"] == resharded["ranks"] == 2
        assert not list((work / "checkpoints").glob("universal-*")), "the converted copy was left behind"
        resumed = curve(log)
        assert sorted(resumed) == list(resumed_steps)
        vs_b, vs_a = relative(resumed, b, resumed_steps), relative(resumed, a, resumed_steps)
        print(
            f"\n{name}: tensor={saved[0]} -> {running[0]} at step {SAVED_AT} (conversion"
            f" {resharded['seconds']}s): max relative loss difference over steps {SAVED_AT + 1}-{STEPS}:"
            f" {vs_b:.2e} vs dp, {vs_a:.2e} vs tp"
        )
        assert vs_b < TOLERANCE and vs_a < TOLERANCE
        # Its own checkpoints are cut for the mesh it ran under.
        assert saved_mesh(work / "checkpoints" / tag_for(STEPS)) == running


def fake_checkpoint(directory: Path, files: list[str]) -> Path:
    directory.mkdir(parents=True)
    for name in files:
        (directory / name).touch()
    return directory


def engine(tensor: int, universal: bool = True, stages: Any = None) -> Any:
    """What check_mesh reads of DeepSpeed's engine: AutoTP size, pipeline stages, optimiser kind."""
    optimizer = SimpleNamespace(
        **({"load_hp_checkpoint_state_from_checkpoint_dir": None} if universal else {})
    )
    return SimpleNamespace(autotp_size=lambda: tensor, num_stages=stages, optimizer=optimizer)


TP2_ZERO1 = [
    "mp_rank_00_model_states.pt",
    "mp_rank_01_model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_0_mp_rank_01_optim_states.pt",
]


def test_a_tensor_change_is_admitted_with_zero_partitions_only(tmp_path: Path) -> None:
    zero1 = fake_checkpoint(tmp_path / "step-00000010", TP2_ZERO1)
    check_mesh(zero1, engine(1))  # re-sliced by the universal conversion
    check_mesh(zero1, engine(2))
    # ZeRO-0 in FP32: no optimiser partitions for ds_to_universal, and a torch optimiser to load into.
    zero0 = fake_checkpoint(tmp_path / "step-00000020", TP2_ZERO1[:2])
    with pytest.raises(ConfigError, match="tensor=2 pipeline=1, this run has tensor=1 pipeline=1: a tensor"):
        check_mesh(zero0, engine(1))
    with pytest.raises(ConfigError, match="needs ZeRO partitions"):
        check_mesh(zero1, engine(1, universal=False))


def test_a_tensor_change_to_or_from_a_pipeline_run_is_still_refused(tmp_path: Path) -> None:
    # A pipeline change at tensor 1 is re-sliced: test_parallel_pipeline_reshard.
    layers = [f"layer_{i:02d}-model_states.pt" for i in range(4)]
    pipeline = fake_checkpoint(tmp_path / "step-00000010", [*TP2_ZERO1, *layers])
    with pytest.raises(ConfigError, match="this run has tensor=2 pipeline=1: resume it with the same"):
        check_mesh(pipeline, engine(2))
    check_mesh(pipeline, engine(1, stages=2))
