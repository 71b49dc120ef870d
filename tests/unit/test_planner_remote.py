"""status.remote, RemoteSynced and its Events from the trainer's remote metrics and the stages'
termination messages (planner.remote), as the controller applies them after a scrape."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

from llmop import planner, progress
from llmop.conditions import REMOTE_SYNCED
from llmop.observe import BatchJobView
from llmop.planner import JobSnapshot, Observed, remote, resume
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.status import LLMTrainingJobStatus
from llmop_contract.protocol import Metric
from tests.unit.test_planner import NOW, pod, running_status

URI = "s3://runs/j"


def spec(**storage: Any) -> LLMTrainingJobSpec:
    raw: dict[str, Any] = {
        "data": {"prepare": False},
        "training": {"maxSteps": 10, "globalBatchSize": 2, "microBatchSize": 1},
        "workers": {"numNodes": 2, "procsPerNode": 1, "gpusPerNode": 1},
        "storage": {
            "remote": {"uri": URI},
            "objectStore": {"credentialsSecret": "vault-creds-7f"},
            **storage,
        },
    }
    return LLMTrainingJobSpec.model_validate(raw)


def snapshot(s: LLMTrainingJobSpec, status: LLMTrainingJobStatus | None = None) -> JobSnapshot:
    return JobSnapshot(
        "j", "ns", "uid", 1, s, status or LLMTrainingJobStatus.model_validate(running_status())
    )


def metrics(step: int = 0, pending: int = 0, failures: int = 0, failing: int = 0, resumed: int = 0) -> str:
    return "\n".join(
        [
            f"# TYPE {Metric.STEP} gauge",
            f"{Metric.STEP} 40",
            f"{Metric.RESUMED_FROM_STEP} 30",
            f"{Metric.RESUMED_FROM_REMOTE} {resumed}",
            f"{Metric.REMOTE_CHECKPOINT_STEP} {step}",
            f"{Metric.REMOTE_UPLOADS_PENDING} {pending}",
            "# TYPE llmtrain_remote_upload_failures counter",
            f"{Metric.REMOTE_UPLOAD_FAILURES} {failures}",
            f"{Metric.REMOTE_UPLOAD_FAILING} {failing}",
            "",
        ]
    )


def scrape(job: JobSnapshot, text: str) -> planner.Plan:
    """One pass over the running gang, then the scrape the controller adds to its plan."""
    result, values = planner.plan(job, Observed([pod(0), pod(1)], None, NOW)), progress.parse(text)
    resume.report(job, result, result.status.attempt, resume.Resumed.scraped(values))
    remote.scraped(job, result, values, NOW)
    return result


def condition(result: planner.Plan) -> tuple[str, str, str]:
    c = next(c for c in result.status.conditions if c.type == REMOTE_SYNCED)
    return c.status.value, c.reason, c.message


def test_status_remote_from_the_metrics() -> None:
    result = scrape(snapshot(spec()), metrics(step=20, pending=1, failures=2))
    r = result.status.remote
    assert r is not None and r.uri == URI
    assert (r.checkpoint_step, r.checkpoint_uri) == (20, f"{URI}/checkpoints/step-00000020")
    assert (r.pending_uploads, r.failed_uploads, r.update_time) == (1, 2, "2026-11-24T12:00:00Z")


def test_remote_synced_follows_pending_current_and_failing() -> None:
    job = snapshot(spec())
    pending = scrape(job, metrics(step=10, pending=1))
    assert condition(pending)[:2] == ("False", "UploadPending") and pending.events == []
    current = scrape(replace(job, status=pending.status), metrics(step=20))
    assert condition(current) == ("True", "UploadsCurrent", f"{URI} is current (step 20)")
    assert current.events == [], "a checkpoint's upload is not worth an Event"


def test_a_failing_upload_is_a_condition_and_one_warning_naming_the_uri_and_count() -> None:
    job = snapshot(spec())
    failing = scrape(job, metrics(step=10, pending=1, failures=3, failing=1))
    status, reason, message = condition(failing)
    assert (status, reason) == ("False", "UploadFailed")
    assert URI in message and "3 upload attempt(s)" in message
    assert [(e.reason, e.warning) for e in failing.events] == [("UploadFailed", True)]
    # Still failing on the next scrape: no second Warning.
    again = scrape(replace(job, status=failing.status), metrics(step=10, pending=2, failures=5, failing=1))
    assert condition(again)[1] == "UploadFailed" and "5 upload attempt(s)" in condition(again)[2]
    assert again.events == []
    # Recovered: a Normal Event, the condition current again.
    healed = scrape(replace(job, status=again.status), metrics(step=30, failures=5))
    assert condition(healed)[:2] == ("True", "UploadsCurrent")
    assert [(e.reason, e.warning) for e in healed.events] == [("UploadsCurrent", False)]


def test_the_credentials_secret_is_never_in_status_or_events() -> None:
    result = scrape(snapshot(spec()), metrics(failures=1, failing=1, resumed=1))
    text = json.dumps(result.status.to_wire()) + " ".join(e.message for e in result.events)
    assert "vault-creds-7f" not in text and "credentialsSecret" not in text


def test_a_trainer_without_remote_metrics_leaves_the_condition_alone() -> None:
    result = scrape(snapshot(spec()), f"{Metric.STEP} 5\n")
    assert all(c.type != REMOTE_SYNCED for c in result.status.conditions)


def test_model_uris_from_termination_messages() -> None:
    s = spec()
    raw = s.to_wire()
    raw["compression"] = {
        "quantization": [{"method": "Int8WeightOnly"}],
        "selection": {"objective": "Smallest"},
    }
    s = LLMTrainingJobSpec.model_validate(raw)
    pending = scrape(snapshot(s), metrics(step=10, pending=1))
    trained = {
        "step": 10,
        "totalSteps": 10,
        "modelPath": "/var/lib/llmop/output/model",
        "modelUri": f"{URI}/model",
    }
    done = [
        replace(pod(i, phase="Succeeded"), termination_message=json.dumps(trained) if i == 0 else "")
        for i in range(2)
    ]
    after = planner.plan(snapshot(s, pending.status), Observed(done, None, NOW))
    train = next(x for x in after.status.stages if x.name == "train")
    assert train.output_uri == f"{URI}/model"
    assert after.status.remote is not None and after.status.remote.model_uri == f"{URI}/model"
    assert after.status.remote.pending_uploads == 0
    assert condition(after)[:2] == ("True", "UploadsCurrent"), "exit 0 means every upload is complete"
    # The compression stage's upload becomes the job's model once selection picks it.
    figures = {
        "modelPath": "/var/lib/llmop/output/quantize-0",
        "modelUri": f"{URI}/compressed/quantize-0",
        "results": {"sizeBytes": 100.0, "sizeRatio": 0.3, "perplexityIncreasePercent": 1.0},
    }
    cpod = replace(
        pod(0, phase="Succeeded"), stage="quantize-0", termination_message=json.dumps(figures), index=-1
    )
    job = BatchJobView(
        "j-compress-quantize-0", True, False, "", 0, stage="quantize-0", uid="b1", owner_uid="uid"
    )
    final = planner.plan(
        snapshot(s, after.status),
        Observed([], None, NOW + timedelta(seconds=5), compress_jobs=[job], compress_pods=[cpod]),
    )
    q = next(x for x in final.status.stages if x.name == "quantize-0")
    assert q.output_uri == f"{URI}/compressed/quantize-0"
    assert final.status.selected_stage == "quantize-0"
    assert final.status.remote is not None and final.status.remote.model_uri == f"{URI}/compressed/quantize-0"
