"""A mid-run checkpoint resumed under another mesh, through the real trainer on 2 CPU ranks: what the
tensor and the pipeline reshard tests share (test_parallel_reshard, test_parallel_pipeline_reshard)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llmtrain.testing import debug_config
from llmtrain.train.checkpoint import saved_mesh, tag_for
from tests.trainer.ranks import events, torchrun

STEPS = 30
SAVED_AT = 15
Spec = Callable[[dict[str, int]], dict[str, Any]]
"""A test module's spec for a mesh, run for STEPS steps."""


def train(spec: Spec, work: Path, data: Path, mesh: dict[str, int]) -> Path:
    s = spec(mesh)
    s["training"]["checkpointing"] = {"intervalSteps": SAVED_AT, "keepLast": 3}
    log = work / "train.log"
    assert torchrun(debug_config(work, data, s), log) == 0, log.read_text()[-4000:]
    return log


def relative(a: dict[int, float], b: dict[int, float], steps: range) -> float:
    return max(abs(a[s] - b[s]) / b[s] for s in steps)


def assert_resumes_both_ways(
    spec: Spec,
    curve: Callable[[Path], dict[int, float]],
    tolerance: float,
    tmp_path: Path,
    data: Path,
    model: tuple[str, dict[str, int], tuple[int, int], str],
) -> None:
    """Run A under the ``model`` mesh (short name, parallelism, its (tensor, pipeline), the start
    event's mesh) and B under data parallel, 30 steps each with a step-15 checkpoint; A's checkpoint
    resumed under data parallel and B's under A's mesh must continue both curves within ``tolerance``,
    through one ``checkpoint_resharded`` conversion whose copy is removed."""
    short, parallelism, model_mesh, described = model
    a_log = train(spec, tmp_path / short, data, parallelism)
    b_log = train(spec, tmp_path / "dp", data, {})
    a, b = curve(a_log), curve(b_log)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert relative(a, b, range(1, STEPS + 1)) < tolerance, "the two references agree"
    assert saved_mesh(tmp_path / short / "checkpoints" / tag_for(SAVED_AT)) == model_mesh

    resumed_steps = range(SAVED_AT + 1, STEPS + 1)
    cases = (
        (f"{short}-under-dp", tmp_path / short, {}, "data=2 x tensor=1", model_mesh, (1, 1)),
        (f"dp-under-{short}", tmp_path / "dp", parallelism, described, (1, 1), model_mesh),
    )
    for name, source, mesh, start_mesh, saved, running in cases:
        work = tmp_path / name
        tag = tag_for(SAVED_AT)  # the checkpoint alone (its manifest verifies as copied)
        shutil.copytree(source / "checkpoints" / tag, work / "checkpoints" / tag)
        log = train(spec, work, data, mesh)
        start = events(log, "start")[0]
        assert start["resumed_from"] == tag and start["mesh"] == start_mesh
        (resharded,) = events(log, "checkpoint_resharded")
        assert resharded["saved_mesh"] == f"tensor={saved[0]} pipeline={saved[1]}"
        assert resharded["mesh"] == f"tensor={running[0]} pipeline={running[1]}"
        assert resharded["saved_ranks"] == resharded["ranks"] == 2
        assert not list((work / "checkpoints").glob("universal-*")), "the converted copy was left behind"
        resumed = curve(log)
        assert sorted(resumed) == list(resumed_steps)
        vs_b, vs_a = relative(resumed, b, resumed_steps), relative(resumed, a, resumed_steps)
        print(
            f"\n{name}: {saved} -> {running} (tensor, pipeline) at step {SAVED_AT} (conversion"
            f" {resharded['seconds']}s): max relative loss difference over steps {SAVED_AT + 1}-{STEPS}:"
            f" {vs_b:.2e} vs dp, {vs_a:.2e} vs {short}"
        )
        assert vs_b < tolerance and vs_a < tolerance
        # Its own checkpoints are cut for the mesh it ran under.
        assert saved_mesh(work / "checkpoints" / tag_for(STEPS)) == running


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
