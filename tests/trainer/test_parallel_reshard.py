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

from pathlib import Path
from typing import Any

import pytest

from llmtrain.config import ConfigError
from llmtrain.train.checkpoint import check_mesh
from tests.trainer.reshard import STEPS, assert_resumes_both_ways, engine, fake_checkpoint
from tests.trainer.test_parallel_tensor import TOLERANCE, curve, spec


def run_spec(mesh: dict[str, int]) -> dict[str, Any]:
    return spec(mesh, steps=STEPS)


@pytest.mark.slow
def test_a_checkpoint_resumes_under_another_tensor_size_on_the_same_curve(
    english_data: Path, tmp_path: Path
) -> None:
    model = ("tp", {"tensor": 2}, (2, 1), "data=1 x tensor=2")
    assert_resumes_both_ways(run_spec, curve, TOLERANCE, tmp_path, english_data, model)


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
