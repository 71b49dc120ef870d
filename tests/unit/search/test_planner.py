"""The search planner without a cluster: trial bookkeeping, failure policy, completion, restarts."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from llmop.search import planner, sampler, space
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.search_status import LLMHyperparameterSearchStatus
from tests.unit.search.helpers import LR, T0, Search, done, job, spec


def test_first_pass_records_parallel_trials_before_creating_them() -> None:
    s = Search(spec())
    plan = s.step([])
    assert plan.create == [0, 1]
    assert [t["name"] for t in s.status["trials"]] == ["s-000", "s-001"]
    assert all(t["state"] == "Pending" and 1e-5 <= t["parameters"]["lr"] <= 1.0 for t in s.status["trials"])
    assert s.condition("Created")["status"] == "True"  # type: ignore[index]
    assert s.condition("Running")["status"] == "True"  # type: ignore[index]
    assert s.status["state"] == "Running" and s.status["counts"]["pending"] == 2


def test_a_trial_spec_is_the_template_with_the_values_written_in() -> None:
    sp = spec(
        trialTemplate={
            **spec().trial_template.to_wire(),
            "compression": {"quantization": [{"method": "Int8WeightOnly"}]},
        }
    )
    trial = LLMTrainingJobSpec.model_validate(space.trial_spec(sp, {"lr": 0.0042}))
    assert trial.training.optimizer.learning_rate == 0.0042
    assert trial.compression is None, "trials train only; compression is for the best (compressBest)"
    best = LLMTrainingJobSpec.model_validate(space.trial_spec(sp, {"lr": 0.0042}, keep_lifecycle=True))
    assert best.compression is not None


def test_replanning_the_same_state_creates_the_same_trials_not_new_ones() -> None:
    # An operator killed after writing status and before creating the jobs plans again from status.
    s = Search(spec())
    first = s.step([])
    values = [t["parameters"] for t in s.status["trials"]]
    again = s.step([])
    assert again.create == first.create == [0, 1]
    assert [t["parameters"] for t in s.status["trials"]] == values
    assert len(s.status["trials"]) == 2


def test_results_flow_into_status_and_free_slots_start_new_trials() -> None:
    s = Search(spec())
    s.step([])
    s.step([job(0, "Running", 35, 6.1), job(1, "Preparing")])
    assert s.trial(0)["state"] == "Running" and s.trial(1)["state"] == "Running"
    assert s.trial(0)["intermediateValues"] == [{"step": 30, "value": 6.1}], (
        "value of the evaluation at step 30"
    )
    plan = s.step([done(0, 5.5), job(1, "Running", 50, 6.0)])
    assert s.trial(0)["state"] == "Succeeded" and s.trial(0)["value"] == 5.5
    assert s.status["bestTrial"]["name"] == "s-000" and s.status["bestTrial"]["value"] == 5.5
    assert plan.create == [2], "the freed slot goes to the next trial"
    assert "TrialSucceeded" in [e[1] for e in plan.events]


def test_search_succeeds_with_the_best_trial_once_max_trials_finished() -> None:
    s = Search(spec(maxTrials=3))
    s.step([])
    s.step([done(0, 5.9), done(1, 5.4)])
    assert len(s.status["trials"]) == 3
    plan = s.step([done(0, 5.9), done(1, 5.4), done(2, 5.7)])
    succeeded = s.condition("Succeeded")
    assert succeeded and succeeded["status"] == "True" and succeeded["reason"] == "BestTrialFound"
    assert "s-001" in succeeded["message"]
    assert s.status["state"] == "Succeeded" and s.status["counts"]["succeeded"] == 3
    assert s.condition("Running")["status"] == "False"  # type: ignore[index]
    assert plan.create == []


def test_maximize_picks_the_highest_value() -> None:
    s = Search(spec(maxTrials=2, objective={"direction": "Maximize"}))
    s.step([])
    s.step([done(0, 5.9), done(1, 5.4)])
    assert s.status["bestTrial"]["name"] == "s-000"


def test_more_failures_than_allowed_fail_the_search_and_cancel_running_trials() -> None:
    s = Search(spec(maxTrials=6, maxFailedTrials=1))
    s.step([])
    s.step([job(0, "Failed", failed="BackoffLimitExceeded: worker exited 1"), job(1, "Running", 20, 6.5)])
    assert s.trial(0)["state"] == "Failed" and "BackoffLimitExceeded" in s.trial(0)["message"]
    assert s.status["state"] == "Running", "one failure is within maxFailedTrials=1"
    plan = s.step(
        [
            job(0, "Failed", failed="BackoffLimitExceeded: x"),
            job(1, "Running", 30, 6.4),
            job(2, "Failed", failed="PermanentFailure: exit code 2"),
        ]
    )
    failed = s.condition("Failed")
    assert failed and failed["reason"] == "MaxFailedTrialsExceeded" and "2 trials failed" in failed["message"]
    assert s.trial(1)["state"] == "Cancelled" and plan.delete == ["s-001"]
    assert plan.create == [] and s.status["state"] == "Failed"
    # Later passes, with the budget still open (6 trials, 3 recorded), start no trial either.
    for _ in range(3):
        later = s.step([job(0, "Failed", failed="x"), job(2, "Failed", failed="y")], seconds=60)
        assert later.create == [] and len(s.status["trials"]) == 3 and s.status["state"] == "Failed"


def test_preempted_trials_are_not_failures() -> None:
    s = Search(spec(maxTrials=2, maxFailedTrials=0))
    s.step([])
    s.step([job(0, "Restarting", 40, 6.0, disruptions=1), job(1, "Running", 40, 6.0)])
    assert s.trial(0)["state"] == "Running" and s.trial(0)["preemptions"] == 1
    assert s.status["state"] == "Running" and s.status["counts"]["failed"] == 0


def test_a_trial_whose_job_vanished_while_running_fails() -> None:
    s = Search(spec(maxTrials=2))
    s.step([])
    s.step([job(0, "Running", 10, 7.0), job(1, "Running", 10, 7.0)])
    plan = s.step([job(1, "Running", 20, 6.8)])
    assert s.trial(0)["state"] == "Failed" and "deleted" in s.trial(0)["message"]
    assert 0 not in plan.create, "a trial is never started twice"


def test_a_job_the_apiserver_refused_fails_its_trial() -> None:
    s = Search(spec(maxTrials=2))
    s.step([])
    s.step([job(1, "Running")], rejected={0: "the apiserver rejected the trial's job: Unprocessable"})
    assert s.trial(0)["state"] == "Failed" and "rejected" in s.trial(0)["message"]


def test_values_that_clash_fail_the_trial_without_creating_a_job() -> None:
    # Each value is valid with the template (6 = 3 x 2 and 4 = 1 x 4 samples), not the two together.
    nodes = {"name": "nodes", "path": "workers.numNodes", "type": "Categorical", "choices": ["3"]}
    batch = {"name": "batch", "path": "training.globalBatchSize", "type": "Categorical", "choices": ["4"]}
    template = spec().trial_template.to_wire()
    template["training"].update(globalBatchSize=6, microBatchSize=1)
    s = Search(
        spec(
            algorithm="Grid", parameters=[nodes, batch], maxTrials=1, parallelTrials=1, trialTemplate=template
        )
    )
    plan = s.step([])
    assert plan.create == []
    assert s.trial(0)["state"] == "Failed" and "InvalidParameters" in s.trial(0)["message"]
    assert "globalBatchSize" in s.trial(0)["message"]


def test_deadline_fails_the_search_and_stops_its_trials() -> None:
    s = Search(spec(deadlineSeconds=60))
    first = s.step([])
    assert first.requeue_after is not None and 58 <= first.requeue_after <= 60
    plan = s.step([job(0, "Running", 10, 7.0), job(1, "Running", 10, 7.0)], seconds=61)
    failed = s.condition("Failed")
    assert failed and failed["reason"] == "DeadlineExceeded"
    assert sorted(plan.delete) == ["s-000", "s-001"]
    assert {t["state"] for t in s.status["trials"]} == {"Cancelled"}


def test_compress_best_trains_the_best_values_again_before_succeeding() -> None:
    template = {
        **spec().trial_template.to_wire(),
        "compression": {"quantization": [{"method": "Int8WeightOnly"}]},
    }
    s = Search(spec(maxTrials=2, compressBest=True, trialTemplate=template))
    s.step([])
    plan = s.step([done(0, 5.9), done(1, 5.4)])
    assert plan.create_best and s.status["bestJob"] == {"name": "s-best", "state": "Pending"}
    assert s.status["state"] == "Running" and s.condition("Succeeded") is None
    best = job(-1, "Compressing", role="best", name="s-best")
    s.step([done(0, 5.9), done(1, 5.4), best])
    assert s.status["bestJob"]["state"] == "Compressing"
    finished = job(-1, "Succeeded", role="best", name="s-best", succeeded=True)
    s.step([done(0, 5.9), done(1, 5.4), finished])
    assert s.condition("Succeeded")["status"] == "True"  # type: ignore[index]


def test_children_missing_from_status_are_adopted_with_their_recorded_values() -> None:
    s = Search(spec())
    s.step([job(0, "Running", 10, 7.0, parameters={"lr": 0.003})])
    assert s.trial(0)["parameters"] == {"lr": 0.003} and s.trial(0)["state"] == "Running"
    assert [t["index"] for t in s.status["trials"]] == [0, 1]


def test_grid_ends_when_its_points_run_out() -> None:
    grid = {**LR, "step": 10.0, "min": 1e-3, "max": 1e-1}
    s = Search(spec(algorithm="Grid", parameters=[grid], maxTrials=10, parallelTrials=3))
    plan = s.step([])
    assert plan.create == [0, 1, 2]
    assert [t["parameters"]["lr"] for t in s.status["trials"]] == [0.001, 0.01, 0.1]
    s.step([done(0, 6.0), done(1, 5.5), done(2, 5.9)])
    assert s.status["state"] == "Succeeded" and len(s.status["trials"]) == 3


def test_invalid_spec_is_reported_as_failed() -> None:
    result = planner.reject(
        LLMHyperparameterSearchStatus(), 3, T0 + timedelta(seconds=1), "parameter lr: ..."
    )
    status = result.status.to_wire()
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and failed["observedGeneration"] == 3
    assert status["state"] == "Failed"


def test_a_sampler_missing_from_the_operator_image_fails_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_torch(*_: object) -> None:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(sampler, "suggest", no_torch)
    s = Search(spec(algorithm="GaussianProcess"))
    plan = s.step([])
    failed = s.condition("Failed")
    assert failed and failed["reason"] == "AlgorithmUnavailable" and "torch" in failed["message"]
    assert plan.create == [] and s.status["trials"] == []


def test_a_read_taken_before_an_evaluation_finished_is_not_taken_for_its_result() -> None:
    # The trainer moves its step counter to 40 before the evaluation at 40 ends: for a moment the
    # status shows step 40 with the loss of step 20.
    s = Search(spec())
    s.step([])
    s.step([job(0, "Running", 20, 7.0), job(1, "Running")])
    s.step([job(0, "Running", 40, 7.0), job(1, "Running")])
    assert s.trial(0)["intermediateValues"] == [{"step": 20, "value": 7.0}]
    s.step([job(0, "Running", 40, 6.5), job(1, "Running")])
    assert s.trial(0)["intermediateValues"] == [{"step": 20, "value": 7.0}, {"step": 40, "value": 6.5}]


def test_the_evaluation_step_is_taken_from_progress_when_reported() -> None:
    s = Search(spec())
    s.step([])
    exact = dataclasses.replace(job(0, "Running", 40, 7.0), validation_step=30)
    s.step([exact, job(1, "Running")])
    assert s.trial(0)["intermediateValues"] == [{"step": 30, "value": 7.0}]
