"""Building blocks for the search's unit tests: a valid spec, child job views, planner passes."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from llmop.search import planner
from llmop.search.observe import JobView
from llmop_contract.api.v1alpha1.search import LLMHyperparameterSearchSpec
from llmop_contract.api.v1alpha1.search_status import LLMHyperparameterSearchStatus

T0 = datetime(2026, 11, 24, 8, 0, 0, tzinfo=UTC)
LR = {
    "name": "lr",
    "path": "training.optimizer.learningRate",
    "type": "Float",
    "min": 1e-5,
    "max": 1.0,
    "scale": "Log",
}


def template() -> dict[str, Any]:
    return {
        "data": {"sources": [{"uri": "builtin://english"}]},
        "training": {"maxSteps": 100, "evaluation": {"intervalSteps": 10}},
        "workers": {"gpusPerNode": 0},
    }


def spec(**overrides: Any) -> LLMHyperparameterSearchSpec:
    raw: dict[str, Any] = {
        "trialTemplate": template(),
        "parameters": [LR],
        "maxTrials": 4,
        "parallelTrials": 2,
    }
    raw.update(overrides)
    return LLMHyperparameterSearchSpec.model_validate(raw)


def job(
    index: int,
    state: str = "Running",
    step: int | None = None,
    val: float | None = None,
    *,
    name: str | None = None,
    succeeded: bool = False,
    failed: str = "",
    disruptions: int = 0,
    parameters: dict[str, Any] | None = None,
    role: str = "trial",
    total: int = 100,
) -> JobView:
    return JobView(
        name=name or f"s-{index:03d}",
        role=role,
        index=index,
        parameters=parameters,
        state=state,
        succeeded=succeeded,
        failed=bool(failed),
        failure=failed,
        step=step,
        total_steps=total if step is not None else None,
        loss=None,
        validation_loss=val,
        validation_step=None,
        eval_interval=10,
        disruptions=disruptions,
        deleting=False,
    )


def done(index: int, val: float, step: int = 100) -> JobView:
    return job(index, "Succeeded", step, val, succeeded=True)


class Search:
    """A search driven pass by pass, the way the controller does: status out of one pass is the
    status into the next. ``status`` is kept in manifest form (what the apiserver stores), so each
    pass also reads and writes it the way the controller does."""

    def __init__(self, s: LLMHyperparameterSearchSpec, name: str = "s") -> None:
        self.spec, self.name = s, name
        self.status: dict[str, Any] = {}
        self.now = T0

    def step(self, jobs: list[JobView], seconds: float = 1, **observed: Any) -> planner.Plan:
        self.now += timedelta(seconds=seconds)
        status = LLMHyperparameterSearchStatus.model_validate(copy.deepcopy(self.status))
        snap = planner.SearchSnapshot(self.name, "ns", "uid-1", 1, self.spec, status)
        result = planner.plan(snap, planner.Observed(jobs=jobs, now=self.now, **observed))
        self.status = result.status.to_wire()
        return result

    def trial(self, index: int) -> dict[str, Any]:
        return next(t for t in self.status["trials"] if t["index"] == index)

    def condition(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status.get("conditions", []) if c["type"] == type_), None)
