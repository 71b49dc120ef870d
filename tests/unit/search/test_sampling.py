"""Grid, Random, TPE and GaussianProcess trial values, and early stopping, without a cluster."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmop.search import sampler, space, stopping
from llmop_contract.api.v1alpha1.search_status import TrialStatus
from tests.unit.search.helpers import LR, spec

REPO = Path(__file__).resolve().parents[3]


def record(
    index: int, lr: float, value: float | None = None, state: str = "Succeeded", **extra: Any
) -> TrialStatus:
    return TrialStatus.model_validate(
        {
            "index": index,
            "name": f"s-{index:03d}",
            "parameters": {"lr": lr},
            "state": state,
            "value": value,
            **extra,
        }
    )


def objective(lr: float) -> float:
    """A validation-loss-like bowl in log(lr) with its minimum at lr = 10^-2.5."""
    return 5.5 + 0.2 * (math.log10(lr) + 2.5) ** 2


def run_search(algorithm: str, trials: int, **extra: Any) -> list[float]:
    sp = spec(algorithm=algorithm, maxTrials=trials, parallelTrials=1, **extra)
    history: list[TrialStatus] = []
    for i in range(trials):
        values = sampler.suggest(sp, history, i)
        assert values is not None
        history.append(record(i, values["lr"], objective(values["lr"])))
    return [float(r.parameters["lr"]) for r in history]


def test_grid_visits_the_cartesian_product_in_order() -> None:
    params = [
        {
            "name": "lr",
            "path": "training.optimizer.learningRate",
            "type": "Float",
            "min": 1e-4,
            "max": 1e-2,
            "scale": "Log",
            "step": 10,
        },
        {
            "name": "wd",
            "path": "training.optimizer.weightDecay",
            "type": "Float",
            "min": 0,
            "max": 0.2,
            "step": 0.1,
        },
        {
            "name": "opt",
            "path": "training.optimizer.type",
            "type": "Categorical",
            "choices": ["AdamW", "SGD"],
        },
        {"name": "layers", "path": "model.numLayers", "type": "Int", "min": 2, "max": 6, "step": 2},
    ]
    sp = spec(algorithm="Grid", parameters=params, maxTrials=100)
    points = [sampler.suggest(sp, [], i) for i in range(space.grid_size(sp.parameters) + 1)]
    assert points[-1] is None and len(points) == 3 * 3 * 2 * 3 + 1
    assert points[0] == {"lr": 0.0001, "wd": 0.0, "opt": "AdamW", "layers": 2}
    assert points[1] == {"lr": 0.0001, "wd": 0.0, "opt": "AdamW", "layers": 4}, (
        "the last parameter varies fastest"
    )
    expected = {
        (lr, wd, opt, layers)
        for lr in (0.0001, 0.001, 0.01)
        for wd in (0.0, 0.1, 0.2)
        for opt in ("AdamW", "SGD")
        for layers in (2, 4, 6)
    }
    assert {(p["lr"], p["wd"], p["opt"], p["layers"]) for p in points[:-1] if p} == expected


def test_categorical_choices_take_the_type_of_their_field() -> None:
    params = [
        {"name": "hidden", "path": "model.hiddenSize", "type": "Categorical", "choices": ["64", "128"]},
        {
            "name": "ckpt",
            "path": "training.activationCheckpointing",
            "type": "Categorical",
            "choices": ["true", "false"],
        },
    ]
    sp = spec(algorithm="Grid", parameters=params, maxTrials=4)
    assert sampler.suggest(sp, [], 0) == {"hidden": 64, "ckpt": True}


def test_random_values_are_a_function_of_seed_and_index() -> None:
    sp = spec(algorithm="Random", maxTrials=50)
    first = [sampler.suggest(sp, [], i) for i in range(50)]
    assert first == [sampler.suggest(sp, [], i) for i in range(50)], "a restart re-derives the same values"
    assert len({v["lr"] for v in first if v}) == 50, "every trial gets its own random stream"
    other_seed = spec(algorithm="Random", maxTrials=50, seed=7)
    assert sampler.suggest(other_seed, [], 0) != first[0]


_DRAW = """
import json, sys
from llmop.search import sampler
from tests.unit.search.helpers import spec
from tests.unit.search.test_sampling import record, objective
history = [record(i, lr, objective(lr)) for i, lr in enumerate((1e-4, 3e-3, 0.3, 2e-2))]
draws = [sampler.suggest(spec(algorithm=a, randomStartupTrials=2), history, 4) for a in ("Random", "TPE")]
json.dump(draws, sys.stdout)
"""


def test_a_restarted_operator_draws_the_same_values() -> None:
    # A new process, with other hash seeds: values may depend on the seed, index and history only.
    history = [record(i, lr, objective(lr)) for i, lr in enumerate((1e-4, 3e-3, 0.3, 2e-2))]
    here = [sampler.suggest(spec(algorithm=a, randomStartupTrials=2), history, 4) for a in ("Random", "TPE")]
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", _DRAW], cwd=REPO, env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == here


def test_log_scale_samples_uniformly_in_the_logarithm() -> None:
    log_lrs = run_search("Random", 200)
    assert all(1e-5 <= lr <= 1.0 for lr in log_lrs)
    # Uniform in log10 over [-5, 0]: the median is near 10^-2.5; a linear scale would put it near 0.5.
    assert 10**-3.1 < statistics.median(log_lrs) < 10**-1.9
    linear = run_search("Random", 200, parameters=[{**LR, "scale": "Linear"}])
    assert 0.35 < statistics.median(linear) < 0.65


@pytest.mark.parametrize("algorithm", ["TPE", "GaussianProcess"])
def test_model_based_search_beats_random_on_the_same_budget(algorithm: str) -> None:
    budget = 16 if algorithm == "TPE" else 10  # a GP fit costs seconds per trial on two cores
    guided = run_search(algorithm, budget, randomStartupTrials=4)
    blind = run_search("Random", budget)
    best_guided, best_blind = min(map(objective, guided)), min(map(objective, blind))
    print(
        f"{algorithm}: best {best_guided:.4f} (lr {min(guided, key=objective):.3g}), random {best_blind:.4f}"
    )
    assert best_guided <= best_blind
    # After its random start-up trials the model samples near the optimum, not uniformly.
    late = [abs(math.log10(lr) + 2.5) for lr in guided[4:]]
    assert statistics.median(late) < 1.0, late


def test_running_trials_steer_tpe_away_when_trials_run_in_parallel() -> None:
    # Constant liar: a second trial asked while the first runs does not repeat the first's values.
    sp = spec(algorithm="TPE", maxTrials=10, parallelTrials=2, randomStartupTrials=2)
    history = [record(i, lr, objective(lr)) for i, lr in enumerate((1e-4, 3e-3, 0.3))]
    first = sampler.suggest(sp, history, 3)
    assert first is not None
    history.append(record(3, first["lr"], state="Running"))
    second = sampler.suggest(sp, history, 4)
    assert second is not None and second["lr"] != first["lr"]


def curve(lr: float, steps: int = 100) -> list[dict[str, Any]]:
    return [{"step": s, "value": objective(lr) + 2.0 * (1 - s / steps)} for s in range(0, steps + 1, 10)]


def test_median_stops_a_trial_behind_the_median_of_finished_ones_after_warm_up() -> None:
    sp = spec(earlyStopping={"rule": "Median", "minSteps": 30, "startupTrials": 2})
    history = [
        record(0, 3e-3, objective(3e-3), intermediateValues=curve(3e-3)),
        record(1, 1e-2, objective(1e-2), intermediateValues=curve(1e-2)),
    ]
    bad = [{"step": s, "value": 7.0 + (1 - s / 100)} for s in range(0, 51, 10)]
    early = record(2, 1e-5, state="Running", intermediateValues=bad[:4])
    assert stopping.judge(sp, [*history, early], 2) is None, "step 20 is inside the warm-up"
    late = record(2, 1e-5, state="Running", intermediateValues=bad)
    decision = stopping.judge(sp, [*history, late], 2)
    # Judged on its second-latest value: the latest may have been read mid-evaluation.
    assert decision is not None and decision.rule == "Median" and decision.step == 40
    assert "higher than the median" in decision.message
    good = record(3, 4e-3, state="Running", intermediateValues=curve(4e-3)[:6])
    assert stopping.judge(sp, [*history, good], 3) is None


def test_median_waits_for_its_startup_trials() -> None:
    sp = spec(earlyStopping={"rule": "Median", "minSteps": 0, "startupTrials": 3})
    history = [record(0, 3e-3, objective(3e-3), intermediateValues=curve(3e-3))]
    bad = record(1, 1e-5, state="Running", intermediateValues=[{"step": 50, "value": 9.0}])
    assert stopping.judge(sp, [*history, bad], 1) is None


def test_successive_halving_keeps_the_best_third_at_each_rung() -> None:
    sp = spec(earlyStopping={"rule": "SuccessiveHalving", "minSteps": 20, "reductionFactor": 3})
    history = [
        record(i, lr, objective(lr), intermediateValues=curve(lr)) for i, lr in enumerate((3e-3, 1e-2, 1e-3))
    ]
    behind = record(
        3,
        1e-5,
        state="Running",
        intermediateValues=[
            {"step": 0, "value": 9.0},
            {"step": 20, "value": 8.0},
            {"step": 30, "value": 7.9},
        ],
    )
    decision = stopping.judge(sp, [*history, behind], 3)
    assert decision is not None and decision.rule == "SuccessiveHalving" and decision.step == 20
    ahead = record(
        3,
        3e-3,
        state="Running",
        intermediateValues=[
            {"step": 0, "value": 9.0},
            {"step": 20, "value": 5.0},
            {"step": 30, "value": 4.9},
        ],
    )
    assert stopping.judge(sp, [*history, ahead], 3) is None


def test_rung_values_are_those_optuna_records_when_asked_after_every_report() -> None:
    es = spec(
        earlyStopping={"rule": "SuccessiveHalving", "minSteps": 10, "reductionFactor": 2}
    ).early_stopping
    assert es is not None
    values = {0: 9.0, 10: 8.0, 20: 7.0, 50: 6.0}
    assert stopping.rung_values(values, es) == {
        "completed_rung_0": 8.0,  # step 10
        "completed_rung_1": 7.0,  # step 20
        "completed_rung_2": 6.0,  # step 40 first reached at 50
    }
    assert stopping.rung_values(values, es, before=50) == {"completed_rung_0": 8.0, "completed_rung_1": 7.0}
