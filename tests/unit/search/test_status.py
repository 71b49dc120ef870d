"""The search status as the controller reads and writes it: typed in the planner, one manifest out."""

from __future__ import annotations

from llmop.metrics import REGISTRY
from llmop.search import metrics
from llmop_contract.api.v1alpha1.search_status import LLMHyperparameterSearchStatus
from tests.unit.search.helpers import Search, done, job, spec


def test_the_status_a_pass_writes_reads_back_unchanged() -> None:
    s = Search(spec(maxTrials=3, earlyStopping={"rule": "Median", "minSteps": 10, "startupTrials": 1}))
    s.step([])
    s.step([job(0, "Running", 20, 6.0), job(1, "Preparing")])
    s.step([done(0, 5.0), job(1, "Running", 40, 8.0, disruptions=1)])
    status = LLMHyperparameterSearchStatus.model_validate(s.status)
    assert status.to_wire() == s.status
    assert s.status["counts"]["total"] == 3 and s.status["bestTrial"]["value"] == 5.0


def test_metrics_count_trials_by_state_and_report_the_best_value() -> None:
    s = Search(spec(maxTrials=3), name="metrics-search")
    s.step([])
    s.step([done(0, 5.0), job(1, "Running", 20, 6.0)])
    metrics.update("ns", "metrics-search", LLMHyperparameterSearchStatus.model_validate(s.status))

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"namespace": "ns", "search": "metrics-search", **labels})

    assert value("llmop_search_trials", state="Succeeded") == 1
    assert value("llmop_search_trials", state="Running") == 1
    assert value("llmop_search_trials", state="Pending") == 1
    assert value("llmop_search_trials", state="Cancelled") == 0
    assert value("llmop_search_best_objective") == 5.0
    metrics.forget("ns", "metrics-search")
    assert value("llmop_search_trials", state="Succeeded") is None
