"""A checkpoint resumed under another pipeline size, through the real trainer on 2 CPU ranks (gloo).

Run A trains under pipeline=2 (DeepSpeed PipelineModule, ZeRO-1), run B under pure data parallel,
from the same seed and data (test_parallel_pipeline: the two curves agree to ~1e-7). A's mid-run
checkpoint resumed under data parallel, and B's under pipeline=2, go through DeepSpeed's universal
checkpoint (``ds_to_universal`` reads the stages' ZeRO partitions into one folder per parameter, the
folders are renamed between PipelineModule's ``<layer index>.`` names and the Llama's, and the ZeRO-1
loader restores every rank's parameters and Adam moments from them) and must continue both
uninterrupted curves within 1e-4: in FP32 the meshes differ only in summation order. A wrong mapping
is far outside that: swapping the first two blocks' folders (each block's weights and moments in the
other's place) moved the resumed pipeline checkpoint's loss under data parallel by up to 1.5e-2, and
zeroing the converted Adam moments by up to 3.6e-2 (measured by breaking the renames, then the
conversion, on purpose); the run itself agrees to ~2e-6.
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
from llmtrain.train.pipeline import universal_renames
from tests.trainer.ranks import events, torchrun
from tests.trainer.test_parallel_pipeline import TOLERANCE, curve, spec

STEPS = 30
SAVED_AT = 15
PP2: dict[str, int] = {"pipeline": 2}
DP: dict[str, int] = {}


def config(work: Path, data: Path, mesh: dict[str, int]) -> Path:
    s = spec(mesh, steps=STEPS)
    s["training"]["checkpointing"] = {"intervalSteps": SAVED_AT, "keepLast": 3}
    return debug_config(work, data, s)


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
def test_a_checkpoint_resumes_under_another_pipeline_size_on_the_same_curve(
    english_data: Path, tmp_path: Path
) -> None:
    a_log = train(tmp_path / "pp", english_data, PP2)
    b_log = train(tmp_path / "dp", english_data, DP)
    a, b = curve(a_log), curve(b_log)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert relative(a, b, range(1, STEPS + 1)) < TOLERANCE, "the two references agree"
    assert saved_mesh(tmp_path / "pp" / "checkpoints" / tag_for(SAVED_AT)) == (1, 2)

    resumed_steps = range(SAVED_AT + 1, STEPS + 1)
    cases = (
        ("pp-under-dp", tmp_path / "pp", DP, "data=2 x tensor=1", (1, 2), (1, 1)),
        ("dp-under-pp", tmp_path / "dp", PP2, "data=1 x tensor=1 x pipeline=2", (1, 1), (1, 2)),
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
            f"\n{name}: pipeline={saved[1]} -> {running[1]} at step {SAVED_AT} (conversion"
            f" {resharded['seconds']}s): max relative loss difference over steps {SAVED_AT + 1}-{STEPS}:"
            f" {vs_b:.2e} vs dp, {vs_a:.2e} vs pp"
        )
        assert vs_b < TOLERANCE and vs_a < TOLERANCE
        # Its own checkpoints are cut for the mesh it ran under.
        assert saved_mesh(work / "checkpoints" / tag_for(STEPS)) == running


LLAMA = [
    "embed_tokens.weight",
    *(f"layers.{i}.{p}" for i in range(4) for p in ("input_layernorm.weight", "mlp.up_proj.weight")),
    "norm.weight",
    "lm_head.weight",
]


def test_the_universal_folders_are_renamed_both_ways_layer_by_layer() -> None:
    to_pipeline = universal_renames(LLAMA, to_pipeline=True)
    assert to_pipeline["embed_tokens.weight"] == "0.embed_tokens.weight"
    assert to_pipeline["layers.0.mlp.up_proj.weight"] == "1.block.mlp.up_proj.weight"
    assert to_pipeline["layers.3.input_layernorm.weight"] == "4.block.input_layernorm.weight"
    assert (
        to_pipeline["norm.weight"] == "5.norm.weight" and to_pipeline["lm_head.weight"] == "5.lm_head.weight"
    )
    back = universal_renames(list(to_pipeline.values()), to_pipeline=False)
    assert {old: back[new] for old, new in to_pipeline.items()} == {n: n for n in LLAMA}
    with pytest.raises(ValueError, match="not one of the Llama's layers"):
        universal_renames([*LLAMA, "score.weight"], to_pipeline=True)
    with pytest.raises(ValueError, match="not one of the pipeline's layers"):
        universal_renames(["0.embed_tokens.weight", "1.norm.weight", "2.lm_head.weight"], to_pipeline=False)


def fake_checkpoint(directory: Path, files: list[str]) -> Path:
    directory.mkdir(parents=True)
    for name in files:
        (directory / name).touch()
    return directory


def engine(tensor: int, stages: Any = None, universal: bool = True) -> Any:
    """What check_mesh reads of DeepSpeed's engine: AutoTP size, pipeline stages, optimiser kind."""
    optimizer = SimpleNamespace(
        **({"load_hp_checkpoint_state_from_checkpoint_dir": None} if universal else {})
    )
    return SimpleNamespace(autotp_size=lambda: tensor, num_stages=stages, optimizer=optimizer)


PP2_MODEL = ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"] + [
    f"layer_{i:02d}-model_states.pt" for i in range(6)
]
PP2_ZERO1 = [
    *PP2_MODEL,
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "zero_pp_rank_0_mp_rank_01_optim_states.pt",
]


def test_a_pipeline_change_is_admitted_at_tensor_1_with_zero_partitions_only(tmp_path: Path) -> None:
    zero1 = fake_checkpoint(tmp_path / "step-00000010", PP2_ZERO1)
    check_mesh(zero1, engine(1))  # through the universal conversion and the renames
    check_mesh(zero1, engine(1, stages=2))
    with pytest.raises(ConfigError, match="this run has tensor=2 pipeline=1: resume it with the same"):
        check_mesh(zero1, engine(2))
    with pytest.raises(ConfigError, match="this run has tensor=2 pipeline=2: resume it with the same"):
        check_mesh(zero1, engine(2, stages=2))
    # ZeRO-0 in FP32: no optimiser partitions for ds_to_universal, and a torch optimiser to load into.
    zero0 = fake_checkpoint(tmp_path / "step-00000020", PP2_MODEL)
    line = "tensor=1 pipeline=2, this run has tensor=1 pipeline=1: a pipeline size change goes through"
    with pytest.raises(ConfigError, match=line):
        check_mesh(zero0, engine(1))
    with pytest.raises(ConfigError, match="needs ZeRO partitions"):
        check_mesh(zero1, engine(1, universal=False))
    dp = fake_checkpoint(tmp_path / "step-00000030", ["mp_rank_00_model_states.pt", *PP2_ZERO1[-2:-1]])
    check_mesh(dp, engine(1, stages=2))
