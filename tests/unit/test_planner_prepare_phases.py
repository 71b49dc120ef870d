"""data.distributed: the preparation as one Indexed Job per phase, in order, each created once the
one before it succeeded; what the phases' Jobs and pods say in status and metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from llmop import metrics, naming
from llmop.builders import prepare
from llmop.observe import BatchJobView, PodView, batch_job_view, pod_view
from llmop.planner import JobSnapshot, Observed, Plan, plan
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.data import PreparePhase
from llmop_contract.api.v1alpha1.status import LLMTrainingJobStatus
from tests.unit.test_builders import ref
from tests.unit.test_planner import NOW

PHASES = [phase.value for phase in PreparePhase]


def spec(pods: int = 4, **distributed: Any) -> LLMTrainingJobSpec:
    return LLMTrainingJobSpec.model_validate(
        {
            "data": {"sources": [{"uri": "s3://corpus/"}], "distributed": {"pods": pods, **distributed}},
            "training": {"maxSteps": 10, "globalBatchSize": 2, "microBatchSize": 1},
            "workers": {"numNodes": 2, "procsPerNode": 1, "gpusPerNode": 1},
        }
    )


def snapshot(s: LLMTrainingJobSpec, status: LLMTrainingJobStatus | None = None) -> JobSnapshot:
    return JobSnapshot("j", "ns", "uid", 1, s, status or LLMTrainingJobStatus())


def phase_job(phase: str, state: str = "Complete", **status: Any) -> BatchJobView:
    """The view of a phase's Job as the apiserver reports it."""
    conditions = [{"type": state, "status": "True", "message": "Job has failed indexes"}] if state else []
    return batch_job_view(
        {
            "metadata": {"name": f"j-prepare-{phase}", "labels": {naming.PHASE_LABEL: phase}},
            "status": {"conditions": conditions, **status},
        }
    )


def phase_pod(phase: str, index: int, phase_state: str = "Succeeded", **results: float) -> PodView:
    message = json.dumps({"results": results, "phase": phase, "index": index}) if results else ""
    view = pod_view(
        {
            "metadata": {
                "name": f"j-prepare-{phase}-{index}-abcde",
                "labels": {naming.PHASE_LABEL: phase, naming.COMPLETION_INDEX: str(index)},
            },
            "status": {"phase": phase_state},
        }
    )
    return replace(view, termination_message=message)


def run(
    s: LLMTrainingJobSpec,
    jobs: list[BatchJobView],
    pods: Sequence[PodView] = (),
    status: LLMTrainingJobStatus | None = None,
) -> Plan:
    return plan(snapshot(s, status), Observed([], None, NOW, prepare_phases=jobs, compress_pods=list(pods)))


def test_each_phase_starts_only_after_the_one_before_succeeded() -> None:
    s = spec()
    created = []
    jobs: list[BatchJobView] = []
    status = None
    for phase in PHASES:
        p = run(s, jobs, status=status)
        assert p.create_prepare_phase is not None and p.create_prepare_phase.value == phase
        assert not p.create_workers and p.status.state is not None and p.status.state.value == "Preparing"
        created.append(phase)
        status = p.status
        running = run(s, [*jobs, phase_job(phase, state="")], status=status)
        assert running.create_prepare_phase is None, "a phase whose Job exists is never recreated"
        jobs.append(phase_job(phase))
    assert created == PHASES
    done = run(s, jobs, status=status)
    assert done.create_prepare_phase is None and done.create_workers == [0, 1]
    assert done.status.preparation is not None and done.status.preparation.phase is None
    assert [(x.name.value, x.state.value) for x in done.status.preparation.phases] == [
        (ph, "Succeeded") for ph in PHASES
    ]


def test_an_operator_restart_redoes_no_finished_phase() -> None:
    """A fresh status (the operator lost nothing but its memory) with scan and dedup done: cluster next."""
    p = run(spec(), [phase_job("scan"), phase_job("dedup")])
    assert p.create_prepare_phase == PreparePhase.CLUSTER


def test_a_running_phase_shows_its_indexes_retries_and_documents() -> None:
    pods = [
        phase_pod("scan", 0, documentsRead=1000, documentsKept=900),
        phase_pod("scan", 2, documentsRead=1100, documentsKept=1000),
        phase_pod("scan", 1, "Failed"),
        phase_pod("dedup", 0, documentsRead=5, documentsKept=5),  # another phase's: not counted
    ]
    job = phase_job("scan", state="", completedIndexes="0,2", failed=1, active=2)
    p = run(spec(), [job], pods)
    assert p.status.preparation is not None
    [scan] = p.status.preparation.phases
    assert (scan.state.value, scan.pods, scan.completed_indexes, scan.retries) == ("Running", 4, "0,2", 1)
    assert (scan.documents_read, scan.documents_kept) == (2100, 1900)
    stage = next(x for x in p.status.stages if x.name == "prepare")
    assert stage.message == "phase scan: 2/4 pod(s) done"
    metrics.record_preparation("ns", "j", p.status.preparation)
    pods_done = metrics.REGISTRY.get_sample_value(
        "llmop_prepare_phase_pods", {"namespace": "ns", "job": "j", "phase": "scan", "state": "Succeeded"}
    )
    read = metrics.REGISTRY.get_sample_value(
        "llmop_prepare_phase_documents", {"namespace": "ns", "job": "j", "phase": "scan", "kind": "read"}
    )
    assert (pods_done, read) == (2, 2100)
    metrics.forget("ns", "j")
    assert (
        metrics.REGISTRY.get_sample_value(
            "llmop_prepare_phase_documents", {"namespace": "ns", "job": "j", "phase": "scan", "kind": "read"}
        )
        is None
    )


def test_a_refused_phase_fails_the_job_naming_the_phase_and_the_cause() -> None:
    refused = replace(
        phase_pod("scan", 3, "Failed"),
        exit_code=2,
        termination_message=json.dumps(
            {"message": "spec.data.sources[0].uri: 's3://corpus/' does not exist"}
        ),
    )
    p = run(spec(), [phase_job("scan", state="Failed")], [refused])
    assert p.status.state is not None and p.status.state.value == "Failed"
    failed = next(c for c in p.status.conditions if c.type == "Failed")
    assert "phase scan" in failed.message and "does not exist" in failed.message
    assert p.status.preparation is not None and p.status.preparation.phases[0].state.value == "Failed"


def test_the_phase_jobs_are_indexed_with_per_index_retries() -> None:
    job = ref(
        data={
            "sources": [{"uri": "builtin://english"}],
            "distributed": {"pods": 4, "backoffLimitPerIndex": 2},
        }
    )
    for phase in PreparePhase:
        manifest = prepare.build_phase_job(job, phase)
        spec_ = manifest["spec"]
        count = 4 if phase.parallel else 1
        assert manifest["metadata"]["name"] == f"llama-prepare-{phase.value}"
        assert (spec_["completionMode"], spec_["completions"], spec_["parallelism"]) == (
            "Indexed",
            count,
            count,
        )
        assert spec_["backoffLimitPerIndex"] == 2 and "backoffLimit" not in spec_
        template = spec_["template"]
        assert template["metadata"]["labels"][naming.PHASE_LABEL] == phase.value
        container = template["spec"]["containers"][0]
        assert container["args"][-2:] == ["--phase", phase.value]
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])
        rules = spec_["podFailurePolicy"]["rules"]
        assert any(r["action"] == "FailJob" and r["onExitCodes"]["values"] == [2] for r in rules), (
            "a refusal is not retried"
        )


def test_phase_pods_get_their_own_resources_when_given() -> None:
    job = ref(
        data={
            "sources": [{"uri": "builtin://english"}],
            "distributed": {
                "pods": 2,
                "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "8Gi"}},
            },
        }
    )
    container = prepare.build_phase_job(job, PreparePhase.SCAN)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}


def test_distributed_preparation_is_refused_for_supervised_records() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="plain-text corpora"):
        LLMTrainingJobSpec.model_validate(
            {
                "model": {"pretrained": {"uri": "hf://acme/base"}},
                "data": {
                    "sources": [{"uri": "x.jsonl"}],
                    "format": {"type": "Chat"},
                    "distributed": {"pods": 2},
                },
                "training": {"maxSteps": 10, "method": "LoRA"},
            }
        )


def test_every_prepare_pod_gets_the_users_annotations_but_not_the_gangs() -> None:
    job = ref(
        data={"sources": [{"uri": "builtin://english"}], "distributed": {"pods": 2}},
        workers={
            "numNodes": 2,
            "procsPerNode": 8,
            "gpusPerNode": 8,
            "podAnnotations": {"sidecar.istio.io/inject": "false", "scheduling.k8s.io/group-name": "g"},
        },
    )
    for manifest in (prepare.build_prepare_job(job), prepare.build_phase_job(job, PreparePhase.WRITE)):
        annotations = manifest["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"sidecar.istio.io/inject": "false"}, manifest["metadata"]["name"]
