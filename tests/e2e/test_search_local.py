"""LLMHyperparameterSearch end to end on the development runtime: every trial really trains.

The TPE search is examples/search.yaml as shipped; its result is judged against a dense grid over the
same range run through the same stack by benchmarks/hpo_grid.py (figures in benchmarks/hpo_grid.json,
checked to be for this very template). Training is deterministic given the learning rate on one machine
(fixed seed, one thread); on another it moves by a little (other SIMD kernels), and the early-stopping
test reproduces two grid figures within LOSS_TOLERANCE.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.hpo_grid import template_digest
from tests.cluster.conftest import OperatorProcess
from tests.cluster.search.conftest import Searches, delete_searches
from tests.e2e.conftest import pod_processes
from tests.kube import Cluster, wait_for

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
GRID = json.loads((REPO / "benchmarks" / "hpo_grid.json").read_text())
# How far a trial's validation loss may be from the grid recorded on another machine.
# benchmarks/hpo_variation.py retrained the two best grid points with PyTorch's, oneDNN's and MKL's
# kernels limited to AVX2 or to no SIMD and with 2 threads (what another CPU changes by itself): the
# largest spread was 1.07e-4 (benchmarks/hpo_variation.json); the grid recorded on another machine
# four-decimal status values (half a unit, 5e-5, each). 1e-3 is five times both together, and still
# 56 times smaller than the gap between the two best grid points (0.0564): a trainer change that moves
# a trial to a neighbouring grid point's figure fails.
LOSS_TOLERANCE = 1e-3


def example() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "examples" / "search.yaml").read_text()))


@pytest.fixture
def searches(cluster: Cluster, namespace: str) -> Searches:
    return Searches(cluster, namespace)


@pytest.fixture
def search_operator(
    cluster: Cluster, runtime: Any, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster, namespace, tmp_path)
    op.start()
    yield op
    delete_searches(cluster, namespace)
    op.shutdown()
    print(f"\n--- operator log (tail) ---\n{op.log()}")


def follow(searches: Searches, name: str, timeout: float) -> tuple[dict[str, Any], int]:
    """Wait until the search finished; returns its status and the most trials seen running at once."""
    peak = 0

    def finished() -> dict[str, Any] | None:
        nonlocal peak
        status = searches.status(name)
        peak = max(peak, (status.get("counts") or {}).get("running", 0))
        if status.get("state") == "Failed":
            raise AssertionError(f"{name} failed: {status.get('conditions')}")
        return status if status.get("state") == "Succeeded" else None

    return dict(wait_for(finished, timeout=timeout, interval=2, what=f"{name} Succeeded")), peak


def table(status: dict[str, Any]) -> str:
    rows = []
    for t in status["trials"]:
        outcome = f"{t['value']:.4f}" if t.get("value") is not None else t["state"]
        if t.get("stoppedEarly"):
            outcome += f" at step {t['stoppedEarly']['step']}"
        rows.append(f"  {t['name']}  lr {t['parameters']['lr']:<11.4g} {outcome}")
    return "\n".join(rows)


@pytest.mark.timeout(2400)
def test_tpe_finds_a_learning_rate_as_good_as_a_dense_grid(
    cluster: Cluster, searches: Searches, search_operator: OperatorProcess
) -> None:
    manifest = example()
    assert GRID["templateDigest"] == template_digest(manifest["spec"]["trialTemplate"]), (
        "benchmarks/hpo_grid.json was recorded for another trial template: rerun benchmarks/hpo_grid.py"
    )
    cluster.kubectl("apply", "-n", searches.ns, "-f", "-", input=json.dumps(manifest))
    status, peak = follow(searches, "lr-search", timeout=2100)

    best, grid_best = status["bestTrial"], GRID["best"]
    gap = (best["value"] - grid_best["validationLoss"]) / grid_best["validationLoss"]
    print(f"\n{table(status)}")
    print(
        f"TPE best: {best['name']} lr {best['parameters']['lr']:.4g} validation loss {best['value']:.4f};"
        f" grid of {len(GRID['points'])} best: lr {grid_best['lr']:.4g} {grid_best['validationLoss']:.4f};"
        f" gap {100 * gap:+.2f}%"
    )
    assert status["counts"]["total"] == 8 and status["counts"]["failed"] == 0
    assert peak == 2, f"at most parallelTrials=2 trials run at once, and 2 did ({peak})"
    assert gap <= 0.05, "TPE's best is more than 5% worse than the grid's"
    assert best["value"] == min(t["value"] for t in status["trials"] if t.get("value") is not None)


@pytest.mark.timeout(1500)
def test_a_bad_learning_rate_is_stopped_early(
    cluster: Cluster, namespace: str, searches: Searches, search_operator: OperatorProcess
) -> None:
    # Two good learning rates from the recorded grid, then one far too small for 120 steps.
    ranked = sorted(
        (p for p in GRID["points"] if p["validationLoss"] is not None), key=lambda p: p["validationLoss"]
    )
    good = [ranked[0], ranked[1]]
    bad = min(GRID["points"], key=lambda p: p["lr"])
    manifest = example()
    manifest["metadata"]["name"] = "stop"
    spec = manifest["spec"]
    choices = [f"{p['lr']:.6g}" for p in (*good, bad)]
    spec["parameters"] = [
        {"name": "lr", "path": spec["parameters"][0]["path"], "type": "Categorical", "choices": choices}
    ]
    spec.update(algorithm="Grid", maxTrials=3, parallelTrials=2)
    spec["earlyStopping"] = {"rule": "Median", "minSteps": 40, "startupTrials": 2}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    status, _ = follow(searches, "stop", timeout=1200)
    print(f"\n{table(status)}")

    first, second, stopped = status["trials"]
    assert stopped["state"] == "StoppedEarly", stopped
    assert stopped["stoppedEarly"]["rule"] == "Median" and 40 <= stopped["stoppedEarly"]["step"] < 120
    assert stopped["step"] < 120, "it trained fewer steps than the budget"
    assert "higher than the median" in stopped["stoppedEarly"]["message"]
    print(f"stopped early: {stopped['stoppedEarly']['message']} (trained {stopped['step']} of 120 steps)")
    # Its job, pods and processes are gone; the good trials' results stay.
    wait_for(
        lambda: "stop-002" not in {j["metadata"]["name"] for j in searches.jobs("stop")}, what="job deleted"
    )
    wait_for(
        lambda: not [p for p in pod_processes(namespace) if "stop-002" in p[1]["LLMOP_RUNTIME_POD"]],
        what="no process",
    )
    assert any(e["reason"] == "TrialStoppedEarly" for e in searches.events("stop"))
    # Same learning rate, same loss as in the recorded grid (within what another machine changes): the
    # grid is a fair reference for the TPE test.
    for trial, point in zip((first, second), good, strict=True):
        assert trial["state"] == "Succeeded", trial
        assert abs(trial["value"] - point["validationLoss"]) <= LOSS_TOLERANCE, (
            f"{trial['name']} gave {trial['value']} where benchmarks/hpo_grid.json has {point}"
            f" (recorded on {GRID.get('machine', 'another machine')}), more than {LOSS_TOLERANCE} apart:"
            " the trainer changed since the grid was recorded (rerun benchmarks/hpo_grid.py)"
        )
