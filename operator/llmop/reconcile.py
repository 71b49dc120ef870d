"""The decision: from a job's spec, its last status and what is observed now, what to do next.

Pure and synchronous, so every branch is unit-testable without a cluster; ``controller.py`` gathers
the observations and carries the plan out. Running it twice on the same input plans the same
actions, and every action is idempotent, so a crash at any point converges on the next pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from llmop import conditions as cond
from llmop import naming
from llmop.builders import storage
from llmop.builders.compress import ONNX, Stage, stages
from llmop.capacity import Fit
from llmop.observe import BatchJobView, PodView, ServingView
from llmop.selection import select
from llmop.termination import final_figures
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.lifecycle import ServingSource
from llmop_contract.api.v1alpha1.workload import ExitCodeAction, RestartPolicy

CAPACITY_RECHECK_SECONDS = 2.0


@dataclass(frozen=True)
class JobSnapshot:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: LLMTrainingJobSpec
    status: dict[str, Any]


@dataclass(frozen=True)
class Observed:
    pods: list[PodView]
    prepare: BatchJobView | None
    now: datetime
    fit: Fit | None = None  # only computed when gated workers wait for capacity
    compress_jobs: list[BatchJobView] = field(default_factory=list)
    compress_pods: list[PodView] = field(default_factory=list)
    serving: ServingView | None = None
    serving_unavailable: str | None = None  # e.g. KServe asked for but its CRDs are not installed


@dataclass
class Plan:
    status: dict[str, Any]
    ensure_base: bool = False
    create_prepare: bool = False
    create_workers: list[int] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    ungate: list[str] = field(default_factory=list)
    create_compress: list[Stage] = field(default_factory=list)
    delete_batch_jobs: list[str] = field(default_factory=list)
    finished_stages: list[dict[str, Any]] = field(default_factory=list)  # stage entries that just ended
    serve_model: str | None = None  # ensure serving of this model directory
    remove_serving: bool = False
    delete_job: bool = False
    transitions: list[cond.Transition] = field(default_factory=list)
    requeue_after: float | None = None
    gang_running_since: datetime | None = None  # set when the gang just became fully Running


def classify_failure(spec: LLMTrainingJobSpec, pod: PodView) -> str:
    """'disruption' (not counted), 'retryable' or 'permanent'."""
    if pod.disrupted:
        return "disruption"
    policy = spec.run_policy
    code = pod.exit_code if pod.exit_code is not None else -1
    for rule in policy.exit_code_rules:
        if code in rule.exit_codes:
            return "retryable" if rule.action == ExitCodeAction.RESTART else "permanent"
    if policy.restart_policy == RestartPolicy.NEVER:
        return "permanent"
    if policy.restart_policy == RestartPolicy.EXIT_CODE:
        # Kubeflow's convention: 1-127 are the program's own errors, 128+ are signals (OOM kill, ...).
        return "permanent" if 1 <= code <= 127 else "retryable"
    return "retryable"


class _Planner:
    def __init__(self, job: JobSnapshot, seen: Observed) -> None:
        self.job, self.seen, self.spec = job, seen, job.spec
        self.plan = Plan(status=copy.deepcopy(job.status))
        self.status = self.plan.status
        self.status.setdefault("conditions", [])
        self.status.setdefault("stages", [])
        self.status.setdefault("restartCount", 0)
        self.status.setdefault("disruptionCount", 0)

    # -- helpers -------------------------------------------------------------------------------
    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        t = cond.set_condition(
            self.status["conditions"], type_, status, reason, message, self.job.generation, self.seen.now
        )
        if t:
            self.plan.transitions.append(t)

    def stage(self, name: str, state: str, message: str | None = None) -> dict[str, Any]:
        entries: list[dict[str, Any]] = self.status["stages"]
        entry = next((s for s in entries if s["name"] == name), None)
        if entry is None:
            entry = {"name": name, "state": "Pending"}
            entries.append(entry)
        now = cond.now_iso(self.seen.now)
        if state == "Running" and not entry.get("startTime"):
            entry["startTime"] = now
        if state in ("Succeeded", "Failed") and entry["state"] not in ("Succeeded", "Failed"):
            entry.setdefault("startTime", now)
            entry["completionTime"] = now
            self.plan.finished_stages.append(entry)
        entry["state"] = state
        if message is not None:
            entry["message"] = message
        return entry

    def state(self, value: str) -> None:
        self.status["state"] = value

    def finished(self) -> bool:
        c = self.status["conditions"]
        return cond.is_true(c, cond.SUCCEEDED) or cond.is_true(c, cond.FAILED)

    def delete_all_pods(self) -> None:
        self.plan.delete_pods = [p.name for p in self.seen.pods if not p.deleting]
        # Compression still running when the job fails (deadline, deletion of the gang) stops too.
        self.plan.delete_batch_jobs = [j.name for j in self.seen.compress_jobs if j.active]

    def fail(self, reason: str, message: str) -> None:
        self.delete_all_pods()
        self.condition(cond.RUNNING, False, reason, message)
        self.condition(cond.RESTARTING, False, reason, message)
        self.condition(cond.FAILED, True, reason, message)
        self.status["completionTime"] = cond.now_iso(self.seen.now)
        self.state("Failed")

    # -- the lifecycle -------------------------------------------------------------------------
    def run(self) -> Plan:
        if self.finished():
            self.after_finish()
            return self.plan
        if not self.status.get("startTime"):
            self.status["startTime"] = cond.now_iso(self.seen.now)
        if not cond.is_true(self.status["conditions"], cond.CREATED):
            self.plan.ensure_base = True
            self.condition(cond.CREATED, True, "JobCreated", f"LLMTrainingJob {self.job.name} accepted")
            self.state("Pending")
        self.status["observedGeneration"] = self.job.generation
        if self.deadline_exceeded() or self.suspended():
            return self.plan
        if cond.is_true(self.status["conditions"], cond.TRAINED):
            # The trained model is on the volume: never train again, even if the workers' pods vanish.
            self.post_training()
            return self.plan
        if self.spec.data.prepare and not self.prepared():
            return self.plan
        self.train()
        return self.plan

    def succeed(self, reason: str, message: str) -> None:
        self.condition(cond.RUNNING, False, reason, message)
        self.condition(cond.SUCCEEDED, True, reason, message)
        self.status["completionTime"] = cond.now_iso(self.seen.now)
        self.state("Succeeded")
        self.after_finish()

    def after_finish(self) -> None:
        # A failed job keeps no running pods (a Succeeded one has none); then TTL clean-up.
        running = [p.name for p in self.seen.pods if not p.deleting and p.phase in ("Pending", "Running")]
        self.plan.delete_pods = running
        if cond.is_true(self.status["conditions"], cond.SUCCEEDED):
            self.serve()
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        done = self.status.get("completionTime")
        if ttl is not None and done:
            left = (cond.parse_time(done) - self.seen.now).total_seconds() + ttl
            if left <= 0:
                self.plan.delete_job = True
            else:
                self.plan.requeue_after = left

    def deadline_exceeded(self) -> bool:
        limit = self.spec.run_policy.active_deadline_seconds
        if limit is None:
            return False
        elapsed = (self.seen.now - cond.parse_time(self.status["startTime"])).total_seconds()
        if elapsed < limit:
            self.plan.requeue_after = limit - elapsed
            return False
        self.fail("DeadlineExceeded", f"job ran longer than activeDeadlineSeconds={limit}")
        return True

    def suspended(self) -> bool:
        if self.spec.run_policy.suspend:
            self.delete_all_pods()
            self.condition(
                cond.SUSPENDED, True, "Suspended", "runPolicy.suspend is true: pods deleted, state kept"
            )
            self.condition(cond.RUNNING, False, "Suspended", "the job is suspended")
            self.state("Suspended")
            return True
        if cond.is_true(self.status["conditions"], cond.SUSPENDED):
            self.condition(
                cond.SUSPENDED, False, "Resumed", "the gang is recreated and resumes from its checkpoint"
            )
            # A new attempt (not counted against backoffLimit): the old gang's pods are gone.
            self.status["attempt"] = self.status.get("attempt", 0) + 1
        return False

    def prepared(self) -> bool:
        job = self.seen.prepare
        if job is None:
            self.plan.create_prepare = True
            self.stage("prepare", "Running")
            self.state("Preparing")
            return False
        if job.failed:
            self.stage("prepare", "Failed", job.message)
            self.fail("PreparationFailed", f"data preparation Job {job.name} failed: {job.message}")
            return False
        if not job.succeeded:
            self.stage("prepare", "Running")
            self.state("Preparing")
            return False
        self.stage("prepare", "Succeeded")
        self.condition(cond.PREPARED, True, "PreparationSucceeded", f"Job {job.name} prepared the data")
        return True

    def train(self) -> None:
        attempt = self.status.get("attempt") or 1
        self.status["attempt"] = attempt
        current = [p for p in self.seen.pods if p.attempt == attempt]
        stale = [p for p in self.seen.pods if p.attempt != attempt]
        if stale:
            # Never two gangs at once: the next attempt starts only once every old pod is gone.
            self.plan.delete_pods = [p.name for p in stale if not p.deleting]
            self.state("Restarting")
            return
        n = self.spec.workers.num_nodes
        present = {p.index for p in current}
        missing = [i for i in range(n) if i not in present]
        if missing and any(p.running or p.failed or p.succeeded for p in current):
            # A worker vanished from a started gang (node lost, pod deleted): its peers are stuck
            # in collectives, so the whole gang restarts, without counting against backoffLimit.
            self.restart(attempt, "WorkerLost", f"worker {missing[0]} disappeared from the running gang")
            return
        if missing:
            self.plan.create_workers = missing
            self.stage("train", "Running")
            self.state("Starting")
            return
        if failed := [p for p in current if p.failed]:
            self.restart_or_fail(failed[0], attempt)
            return
        if all(p.succeeded for p in current):
            self.trained(current, attempt)
            return
        self.placement(current)

    def trained(self, current: list[PodView], attempt: int) -> None:
        self.stage("train", "Succeeded")
        rank0 = next((p for p in current if p.index == 0), None)
        figures = final_figures(rank0.termination_message if rank0 else "")
        if figures.progress:
            # The last scrape may predate the final step; the trainer's own summary is authoritative.
            self.status["progress"] = {**(self.status.get("progress") or {}), **figures.progress}
            self.status["progress"]["updateTime"] = cond.now_iso(self.seen.now)
        entry = self.stage("train", "Succeeded")
        entry["outputPath"] = figures.model_path or f"{storage.OUTPUT_DIR}/model"
        self.status["outputModelPath"] = entry["outputPath"]
        message = f"training finished in attempt {attempt}"
        self.condition(cond.TRAINED, True, "TrainingSucceeded", message)
        self.condition(cond.RESTARTING, False, "TrainingSucceeded", message)
        self.post_training()

    def post_training(self) -> None:
        """Compression stages in parallel, then the ONNX export of the chosen model, then success."""
        wanted = stages(self.spec)
        if not self.compressed(wanted) or not self.exported():
            return
        if wanted:
            self.succeed("CompressionSucceeded", f"training and {len(wanted)} compression stages succeeded")
        else:
            self.succeed("TrainingSucceeded", "training finished; no compression requested")

    def compressed(self, wanted: list[Stage]) -> bool:
        if not wanted:
            return True
        jobs = {j.stage: j for j in self.seen.compress_jobs}
        entries = {s["name"]: s for s in self.status["stages"]}
        for st in wanted:
            entry = entries.get(st.name)
            if entry is not None and entry["state"] in ("Succeeded", "Failed"):
                continue  # recorded; the Job itself may be gone by now
            self.compress_stage(st, jobs.get(st.name))
        done = {s["name"]: s for s in self.status["stages"]}
        states = [done[st.name]["state"] for st in wanted]
        if any(s not in ("Succeeded", "Failed") for s in states):
            running = sum(s == "Running" for s in states)
            message = f"{running} of {len(wanted)} compression stages running"
            self.condition(cond.RUNNING, True, "Compressing", message)
            self.state("Compressing")
            return False
        failed = [st.name for st in wanted if done[st.name]["state"] == "Failed"]
        if failed:
            what = ", ".join(f"{n}: {done[n].get('message') or 'failed'}" for n in failed)
            self.condition(cond.COMPRESSED, False, "CompressionFailed", what)
            self.fail(
                "CompressionFailed", f"{len(failed)} of {len(wanted)} compression stages failed ({what})"
            )
            return False
        if not cond.is_true(self.status["conditions"], cond.COMPRESSED):
            self.condition(
                cond.COMPRESSED, True, "CompressionSucceeded", f"all {len(wanted)} stages succeeded"
            )
            self.choose_output(wanted)
        return True

    def exported(self) -> bool:
        """serving.onnxExport: the chosen model exported to ONNX and checked, before the job succeeds."""
        if self.spec.serving is None or not self.spec.serving.onnx_export:
            return True
        entry = next((s for s in self.status["stages"] if s["name"] == ONNX), None)
        if entry is None or entry["state"] not in ("Succeeded", "Failed"):
            job = next((j for j in self.seen.compress_jobs if j.stage == ONNX), None)
            self.compress_stage(Stage(ONNX, "ONNX", self.served_model()), job)
            entry = next(s for s in self.status["stages"] if s["name"] == ONNX)
        if entry["state"] == "Failed":
            self.fail("OnnxExportFailed", f"ONNX export failed: {entry.get('message') or 'see the Job'}")
            return False
        if entry["state"] != "Succeeded":
            self.condition(cond.RUNNING, True, "ExportingOnnx", "exporting the chosen model to ONNX")
            self.state("Compressing")
            return False
        return True

    def served_model(self) -> str:
        """The model the spec's serving.source names: the trained one or the selected output."""
        train: dict[str, Any] = next((s for s in self.status["stages"] if s["name"] == "train"), {})
        trained = train.get("outputPath") or f"{storage.OUTPUT_DIR}/model"
        if self.spec.serving is not None and self.spec.serving.source == ServingSource.TRAINED:
            return str(trained)
        return str(self.status.get("outputModelPath") or trained)

    def serve(self) -> None:
        s = self.spec.serving
        if s is None or not s.enabled:
            if self.seen.serving is not None or self.status.get("serving"):
                self.plan.remove_serving = True
                self.status.pop("serving", None)
                self.condition(cond.SERVING, False, "ServingDisabled", "serving.enabled is false: removed")
            if self.status.get("state") == "Serving":
                self.state("Succeeded")
            return
        if self.seen.serving_unavailable:
            self.condition(cond.SERVING, False, "ServingUnavailable", self.seen.serving_unavailable)
            return
        model = self.served_model()
        self.plan.serve_model = model
        view = self.seen.serving
        default_url = f"http://{naming.serving_name(self.job.name)}.{self.job.namespace}.svc:{s.port}/v1"
        serving: dict[str, Any] = {
            "url": view.url if view and view.url else default_url,
            "ready": bool(view and view.ready),
            "readyReplicas": view.ready_replicas if view else 0,
            "kind": "InferenceService" if s.kserve else "Deployment",
            "modelPath": model,
        }
        onnx = next((x for x in self.status["stages"] if x["name"] == ONNX and x.get("outputPath")), None)
        if onnx:
            serving["onnxPath"] = onnx["outputPath"]
        self.status["serving"] = serving
        if serving["ready"]:
            self.condition(cond.SERVING, True, "Ready", f"{model} answers at {serving['url']}")
            self.state("Serving")
        else:
            ready = serving["readyReplicas"]
            self.condition(cond.SERVING, False, "Starting", f"{ready}/{s.replicas} serving replicas ready")
            self.state("Succeeded")

    def compress_stage(self, st: Stage, job: BatchJobView | None) -> None:
        ctype = cond.STAGE_PREFIX + st.name
        if job is None:
            self.plan.create_compress.append(st)
            entry = self.stage(st.name, "Running")
            self.condition(ctype, False, "Running", f"{st.method} started")
        elif job.failed:
            entry = self.stage(st.name, "Failed", job.message or "the compression Job failed")
            self.condition(ctype, False, "Failed", entry["message"])
        elif job.succeeded:
            pod = next((p for p in self.seen.compress_pods if p.stage == st.name and p.succeeded), None)
            figures = final_figures(pod.termination_message if pod else "")
            entry = self.stage(st.name, "Succeeded", "; ".join(figures.summary) or None)
            entry["results"] = figures.results
            if figures.model_path:
                entry["outputPath"] = figures.model_path
            self.condition(ctype, True, "Succeeded", entry.get("message") or f"{st.method} done")
        else:
            entry = self.stage(st.name, "Running")
            retry = f" (retry {job.failures} after a failed pod)" if job.failures else ""
            self.condition(ctype, False, "Running", f"{st.method} running{retry}")
        entry["method"] = st.method
        if job is not None and job.failures:
            entry["retries"] = job.failures

    def choose_output(self, wanted: list[Stage]) -> None:
        rule = self.spec.compression.selection if self.spec.compression else None
        if rule is None:
            return
        names = {st.name for st in wanted}
        candidates = [s for s in self.status["stages"] if s["name"] in names]
        pick, why = select(rule, candidates)
        if pick is not None:
            self.status["selectedStage"] = pick["name"]
            if pick.get("outputPath"):
                self.status["outputModelPath"] = pick["outputPath"]
        self.condition("OutputSelected", pick is not None, "Selected" if pick else "NoneEligible", why)

    def placement(self, current: list[PodView]) -> None:
        gated = [p for p in current if p.gated]
        if gated and self.seen.fit is None:
            # Someone else's gate (Kueue admission): the whole group is released together by them.
            queue = self.spec.scheduling.queue_name
            self.condition(
                cond.GANG_SCHEDULED,
                False,
                "AwaitingAdmission",
                f"{len(gated)} workers wait for Kueue to admit the pod group (queue {queue})",
            )
            self.state("Pending")
            return
        if gated and self.seen.fit is not None:
            if self.seen.fit.fits:
                self.plan.ungate = [p.name for p in gated]
                self.condition(cond.GANG_SCHEDULED, True, "GangAdmitted", self.seen.fit.message)
            else:
                self.condition(cond.GANG_SCHEDULED, False, "InsufficientCapacity", self.seen.fit.message)
                self.state("Pending")
                # Capacity frees up without any event on this job's children: look again soon.
                self.plan.requeue_after = CAPACITY_RECHECK_SECONDS
                return
        if unschedulable := [p for p in current if p.unschedulable]:
            self.condition(
                cond.GANG_SCHEDULED,
                False,
                "Unschedulable",
                f"{unschedulable[0].name}: {unschedulable[0].unschedulable}",
            )
            self.state("Pending")
            return
        if all((p.running and p.ready) or p.succeeded for p in current):
            if not cond.is_true(self.status["conditions"], cond.RUNNING):
                self.plan.gang_running_since = self.seen.now
            self.condition(cond.GANG_SCHEDULED, True, "GangScheduled", f"all {len(current)} workers placed")
            self.condition(cond.RESTARTING, False, "AllWorkersRunning", "the gang is running")
            self.condition(cond.RUNNING, True, "AllWorkersRunning", f"all {len(current)} workers are running")
            self.state("Running")
        else:
            self.state("Starting")

    def restart_or_fail(self, pod: PodView, attempt: int) -> None:
        kind = classify_failure(self.spec, pod)
        what = f"worker {pod.name} failed (exit code {pod.exit_code}, reason {pod.reason or 'Error'})"
        if kind == "permanent":
            self.fail("PermanentFailure", f"{what}; not retryable under the restart policy")
            return
        if kind == "retryable":
            limit = self.spec.run_policy.backoff_limit
            if self.status.get("restartCount", 0) >= limit:
                self.fail("BackoffLimitExceeded", f"{what}; backoffLimit {limit} reached")
                return
            self.status["restartCount"] = self.status.get("restartCount", 0) + 1
            self.restart(attempt, "WorkerFailed", what)
        else:
            self.restart(attempt, "WorkerDisrupted", what)

    def restart(self, attempt: int, reason: str, what: str) -> None:
        if reason != "WorkerFailed":
            self.status["disruptionCount"] = self.status.get("disruptionCount", 0) + 1
        # Record the new attempt before deleting anything: if the operator dies right after, the
        # next pass sees attempt-N pods as stale and finishes the restart without counting twice.
        self.status["attempt"] = attempt + 1
        self.delete_all_pods()
        self.condition(cond.RUNNING, False, reason, what)
        self.condition(
            cond.RESTARTING, True, reason, f"{what}; restarting the whole gang as attempt {attempt + 1}"
        )
        self.state("Restarting")


def plan(job: JobSnapshot, seen: Observed) -> Plan:
    return _Planner(job, seen).run()
