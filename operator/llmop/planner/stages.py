"""After training: the compression stages in parallel, the choice of output (compression.selection),
then the ONNX export of the chosen model, then success."""

from __future__ import annotations

from llmop import conditions as cond
from llmop.builders.compress import ONNX, Stage, stages
from llmop.observe import BatchJobView
from llmop.planner import lifecycle, serving
from llmop.planner.context import Pass
from llmop.selection import select
from llmop.termination import final_figures, refusal
from llmop_contract.api.v1alpha1.status import (
    FINISHED_STAGE_STATES,
    JobReason,
    JobState,
    StageState,
    StageStatus,
)


def post_training(p: Pass) -> None:
    wanted = stages(p.spec)
    if not compressed(p, wanted) or not exported(p):
        return
    if wanted:
        message = f"training and {len(wanted)} compression stages succeeded"
        lifecycle.succeed(p, JobReason.COMPRESSION_SUCCEEDED, message)
    else:
        lifecycle.succeed(p, JobReason.TRAINING_SUCCEEDED, "training finished; no compression requested")


def compressed(p: Pass, wanted: list[Stage]) -> bool:
    """Every wanted stage has finished and succeeded (the output chosen once); False while any runs
    or when one failed (the job then fails, once all have finished)."""
    if not wanted:
        return True
    jobs = {j.stage: j for j in p.seen.compress_jobs}
    for st in wanted:
        entry = p.find_stage(st.name)
        if entry is not None and entry.state in FINISHED_STAGE_STATES:
            continue  # recorded; the Job itself may be gone by now
        compress_stage(p, st, jobs.get(st.name))
    done = {s.name: s for s in p.status.stages}
    states = [done[st.name].state for st in wanted]
    if any(s not in FINISHED_STAGE_STATES for s in states):
        running = sum(s == StageState.RUNNING for s in states)
        message = f"{running} of {len(wanted)} compression stages running"
        p.condition(cond.RUNNING, True, JobReason.COMPRESSING, message)
        p.status.state = JobState.COMPRESSING
        return False
    failed = [st.name for st in wanted if done[st.name].state == StageState.FAILED]
    if failed:
        what = ", ".join(f"{n}: {done[n].message or 'failed'}" for n in failed)
        p.condition(cond.COMPRESSED, False, JobReason.COMPRESSION_FAILED, what)
        message = f"{len(failed)} of {len(wanted)} compression stages failed ({what})"
        p.fail(JobReason.COMPRESSION_FAILED, message)
        return False
    if not p.holds(cond.COMPRESSED):
        message = f"all {len(wanted)} stages succeeded"
        p.condition(cond.COMPRESSED, True, JobReason.COMPRESSION_SUCCEEDED, message)
        choose_output(p, wanted)
    return True


def exported(p: Pass) -> bool:
    """serving.onnxExport: the chosen model exported to ONNX and checked, before the job succeeds."""
    if p.spec.serving is None or not p.spec.serving.onnx_export:
        return True
    entry = p.find_stage(ONNX)
    if entry is None or entry.state not in FINISHED_STAGE_STATES:
        job = next((j for j in p.seen.compress_jobs if j.stage == ONNX), None)
        entry = compress_stage(p, Stage(ONNX, "ONNX", serving.served_model(p)), job)
    if entry.state == StageState.FAILED:
        p.fail(JobReason.ONNX_EXPORT_FAILED, f"ONNX export failed: {entry.message or 'see the Job'}")
        return False
    if entry.state != StageState.SUCCEEDED:
        message = "exporting the chosen model to ONNX"
        p.condition(cond.RUNNING, True, JobReason.EXPORTING_ONNX, message)
        p.status.state = JobState.COMPRESSING
        return False
    return True


def compress_stage(p: Pass, st: Stage, job: BatchJobView | None) -> StageStatus:
    """One stage's entry and condition from its batch Job (created when there is none yet)."""
    ctype = cond.STAGE_PREFIX + st.name
    if job is None:
        p.plan.create_compress.append(st)
        entry = p.stage(st.name, StageState.RUNNING)
        p.condition(ctype, False, JobReason.RUNNING, f"{st.method} started")
    elif job.failed:
        message = refusal(p.seen.compress_pods, st.name) or job.message or "the compression Job failed"
        entry = p.stage(st.name, StageState.FAILED, message)
        p.condition(ctype, False, JobReason.FAILED, message)
    elif job.succeeded:
        pod = next((x for x in p.seen.compress_pods if x.stage == st.name and x.succeeded), None)
        figures = final_figures(pod.termination_message if pod else "")
        entry = p.stage(st.name, StageState.SUCCEEDED, "; ".join(figures.summary) or None)
        entry.results = dict(figures.results)
        if figures.model_path:
            entry.output_path = figures.model_path
        if figures.model_uri:
            entry.output_uri = figures.model_uri
        p.condition(ctype, True, JobReason.SUCCEEDED, entry.message or f"{st.method} done")
    elif blocked := p.config_blocked(ctype, [x for x in p.seen.compress_pods if x.stage == st.name]):
        entry = p.stage(st.name, StageState.RUNNING, blocked)
    else:
        entry = p.stage(st.name, StageState.RUNNING)
        entry.message = None  # a missing Secret's message, once it is there
        retry = f" (retry {job.failures} after a failed pod)" if job.failures else ""
        p.condition(ctype, False, JobReason.RUNNING, f"{st.method} running{retry}")
    entry.method = st.method
    if job is not None and job.failures:
        entry.retries = job.failures
    return entry


def choose_output(p: Pass, wanted: list[Stage]) -> None:
    rule = p.spec.compression.selection if p.spec.compression else None
    if rule is None:
        return
    names = {st.name for st in wanted}
    pick, why = select(rule, [s for s in p.status.stages if s.name in names])
    if pick is not None:
        p.status.selected_stage = pick.name
        if pick.output_path:
            p.status.output_model_path = pick.output_path
        if pick.output_uri and p.status.remote is not None:
            p.status.remote.model_uri = pick.output_uri  # the job's output, as outputModelPath
    reason = JobReason.SELECTED if pick else JobReason.NONE_ELIGIBLE
    p.condition(cond.OUTPUT_SELECTED, pick is not None, reason, why)
