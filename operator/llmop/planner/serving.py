"""Serving a succeeded job's model (Deployment or KServe InferenceService), and which model that is."""

from __future__ import annotations

from llmop import conditions as cond
from llmop import naming
from llmop.builders import storage
from llmop.builders.compress import ONNX
from llmop.planner import engine
from llmop.planner.context import TRAIN, Pass
from llmop_contract.api.v1alpha1.lifecycle import ServingSource
from llmop_contract.api.v1alpha1.status import JobReason, JobState, ServingStatus


def served_model(p: Pass) -> str:
    """The model the spec's serving.source names: the trained one or the selected output."""
    train = p.find_stage(TRAIN)
    trained = (train.output_path if train else None) or f"{storage.OUTPUT_DIR}/model"
    if p.spec.serving is not None and p.spec.serving.source == ServingSource.TRAINED:
        return trained
    return p.status.output_model_path or trained


def serve(p: Pass) -> None:
    s = p.spec.serving
    if s is None or not s.enabled:
        if p.seen.serving is not None or p.status.serving is not None:
            p.plan.remove_serving = True
            p.status.serving = None
            message = "serving.enabled is false: removed"
            p.condition(cond.SERVING, False, JobReason.SERVING_DISABLED, message)
        if p.status.state == JobState.SERVING:
            p.status.state = JobState.SUCCEEDED
        return
    if p.seen.serving_unavailable:
        p.condition(cond.SERVING, False, JobReason.SERVING_UNAVAILABLE, p.seen.serving_unavailable)
        return
    model = served_model(p)
    choice = engine.resolve(s, engine.served_stage(s, p.status.selected_stage))
    if choice.engine is None:
        assert choice.problem is not None
        # Nothing serves a model the asked-for engine cannot load: an older engine's pods would
        # answer for a spec that no longer asks for them.
        if p.seen.serving is not None or p.status.serving is not None:
            p.plan.remove_serving = True
        p.status.serving = None
        p.condition(cond.SERVING, False, JobReason.ENGINE_CANNOT_LOAD, choice.problem)
        if p.status.state == JobState.SERVING:
            p.status.state = JobState.SUCCEEDED
        return
    p.plan.serve_model = model
    p.plan.serve_engine = choice.engine
    view = p.seen.serving
    default_url = f"http://{naming.serving_name(p.job.name)}.{p.job.namespace}.svc:{s.port}/v1"
    status = ServingStatus(
        url=view.url if view and view.url else default_url,
        ready=bool(view and view.ready),
        ready_replicas=view.ready_replicas if view else 0,
        kind="InferenceService" if s.kserve else "Deployment",
        engine=choice.engine.value,
        model_path=model,
    )
    onnx = p.find_stage(ONNX)
    if onnx is not None and onnx.output_path:
        status.onnx_path = onnx.output_path
    p.status.serving = status
    if status.ready:
        p.condition(cond.SERVING, True, JobReason.READY, f"{model} answers at {status.url}")
        p.status.state = JobState.SERVING
    else:
        message = f"{status.ready_replicas}/{s.replicas} serving replicas ready"
        p.condition(cond.SERVING, False, JobReason.STARTING, message)
        p.status.state = JobState.SUCCEEDED
