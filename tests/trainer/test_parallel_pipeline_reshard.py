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

from pathlib import Path
from typing import Any

import pytest

from llmtrain.config import ConfigError
from llmtrain.train.checkpoint import check_mesh
from llmtrain.train.pipeline import universal_renames
from tests.trainer.reshard import STEPS, assert_resumes_both_ways, engine, fake_checkpoint
from tests.trainer.test_parallel_pipeline import TOLERANCE, curve, spec


def run_spec(mesh: dict[str, int]) -> dict[str, Any]:
    return spec(mesh, steps=STEPS)


@pytest.mark.slow
def test_a_checkpoint_resumes_under_another_pipeline_size_on_the_same_curve(
    english_data: Path, tmp_path: Path
) -> None:
    model = ("pp", {"pipeline": 2}, (1, 2), "data=1 x tensor=1 x pipeline=2")
    assert_resumes_both_ways(run_spec, curve, TOLERANCE, tmp_path, english_data, model)


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
