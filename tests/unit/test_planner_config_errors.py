"""A pod whose Secret, ConfigMap or key is missing (the kubelet's CreateContainerConfigError) is
named on the job: a condition and one Warning, instead of a job Starting for ever in silence."""

from __future__ import annotations

from dataclasses import replace

from llmop import planner
from llmop.observe import BatchJobView, PodView, pod_view
from llmop.planner import Observed
from tests.unit.test_planner import NOW, pod, snapshot, spec

MISSING = 'secret "s3-keys" not found'


def blocked(index: int) -> PodView:
    return replace(
        pod(index, phase="Pending"), waiting_reason="CreateContainerConfigError", waiting_message=MISSING
    )


def test_the_kubelets_waiting_reason_is_read_off_the_pod() -> None:
    view = pod_view(
        {
            "metadata": {"name": "j-worker-0", "labels": {}},
            "status": {
                "phase": "Pending",
                "containerStatuses": [
                    {"state": {"waiting": {"reason": "CreateContainerConfigError", "message": MISSING}}}
                ],
            },
        }
    )
    assert view.config_error == MISSING
    assert pod(0).config_error is None


def test_a_worker_blocked_by_a_missing_secret_says_so_once() -> None:
    s = spec()
    first = planner.plan(snapshot(s), Observed([], None, NOW))  # the gang is created
    job = snapshot(s, first.status.to_wire())
    p = planner.plan(job, Observed([pod(0), blocked(1)], None, NOW))
    running = next(c for c in p.status.conditions if c.type == "Running")
    assert (running.status.value, running.reason) == ("False", "ContainerConfigError")
    assert "j-worker-1" in running.message and MISSING in running.message
    assert [(e.reason, e.warning) for e in p.events] == [("ContainerConfigError", True)]
    assert p.status.state == "Starting"
    again = planner.plan(snapshot(s, p.status.to_wire()), Observed([pod(0), blocked(1)], None, NOW))
    assert again.events == [], "one Warning, not one per pass"
    fixed = planner.plan(snapshot(s, again.status.to_wire()), Observed([pod(0), pod(1)], None, NOW))
    assert next(c for c in fixed.status.conditions if c.type == "Running").status.value == "True"


def test_a_prepare_pod_blocked_by_a_missing_secret_names_it_on_the_stage() -> None:
    s = spec().model_copy(update={"data": spec().data.model_copy(update={"prepare": True})})
    running = BatchJobView("j-prepare", succeeded=False, failed=False, message="", active=1)
    prep = replace(blocked(0), index=-1, attempt=-1)
    p = planner.plan(snapshot(s), Observed([], running, NOW, compress_pods=[prep]))
    stage = next(x for x in p.status.stages if x.name == "prepare")
    assert stage.message and MISSING in stage.message
    prepared = next(c for c in p.status.conditions if c.type == "DataPrepared")
    assert prepared.reason == "ContainerConfigError" and MISSING in prepared.message
    assert [(e.reason, e.warning) for e in p.events] == [("ContainerConfigError", True)]
    later = planner.plan(
        snapshot(s, p.status.to_wire()),
        Observed([], running, NOW, compress_pods=[replace(prep, waiting_reason="")]),
    )
    assert next(x for x in later.status.stages if x.name == "prepare").message is None


def test_a_compression_pod_blocked_by_a_missing_secret_names_it_on_its_stage() -> None:
    raw = spec().to_wire()
    raw["compression"] = {"quantization": [{"method": "Int8WeightOnly"}]}
    s = type(spec()).model_validate(raw)
    done = [pod(0, phase="Succeeded"), pod(1, phase="Succeeded")]
    trained = planner.plan(snapshot(s), Observed(done, None, NOW))
    assert [st.name for st in trained.create_compress] == ["quantize-0"]
    job = BatchJobView(
        "j-compress-quantize-0", False, False, "", 1, stage="quantize-0", uid="b", owner_uid="uid"
    )
    cpod = replace(blocked(0), stage="quantize-0", index=-1)
    p = planner.plan(
        snapshot(s, trained.status.to_wire()),
        Observed([], None, NOW, compress_jobs=[job], compress_pods=[cpod]),
    )
    entry = next(x for x in p.status.stages if x.name == "quantize-0")
    assert entry.message and MISSING in entry.message
    c = next(c for c in p.status.conditions if c.type == "stage.llmop.io/quantize-0")
    assert c.reason == "ContainerConfigError" and MISSING in c.message
