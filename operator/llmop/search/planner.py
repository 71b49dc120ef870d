"""The decision for one search: from its spec, last status and child jobs, what to do next.

Pure and synchronous (the samplers are seeded per trial, see ``sampler``), so it is unit-tested
without a cluster. The controller writes the planned status *before* it creates the planned trials:
a trial exists in status before its job exists, so a crash in between re-creates the same job (same
name and values) instead of sampling a new one, and a result, once in status, is never lost.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from llmop import conditions as cond
from llmop.search import builders, records, sampler, space, stopping
from llmop.search.observe import JobView, observation
from llmop.search.study import Record
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.search import Algorithm, LLMHyperparameterSearchSpec
from llmop_contract.api.v1alpha1.search_status import TrialState


@dataclass(frozen=True)
class SearchSnapshot:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: LLMHyperparameterSearchSpec
    status: dict[str, Any]


@dataclass(frozen=True)
class Observed:
    jobs: list[JobView]  # every child LLMTrainingJob of the search
    now: datetime
    rejected: dict[int, str] = field(default_factory=dict)  # trial index -> why the apiserver refused its job


@dataclass
class Plan:
    status: dict[str, Any]
    create: list[int] = field(default_factory=list)  # trial indices, each recorded in status
    create_best: bool = False
    delete: list[str] = field(default_factory=list)  # child job names
    transitions: list[cond.Transition] = field(default_factory=list)
    events: list[tuple[bool, str, str]] = field(default_factory=list)  # (warning, reason, message)
    requeue_after: float | None = None


class _Planner:
    def __init__(self, search: SearchSnapshot, seen: Observed) -> None:
        self.search, self.spec, self.seen = search, search.spec, seen
        self.plan = Plan(status=copy.deepcopy(search.status))
        self.status = self.plan.status
        self.status.setdefault("conditions", [])
        self.records: list[Record] = self.status.setdefault("trials", [])
        self.now = cond.now_iso(seen.now)
        self.jobs = {j.index: j for j in seen.jobs if j.role == builders.ROLE_TRIAL and j.index >= 0}
        self.best_job = next((j for j in seen.jobs if j.role == builders.ROLE_BEST), None)
        self.news: set[int] = set()  # trials with a new intermediate value this pass

    # -- helpers -------------------------------------------------------------------------------
    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        t = cond.set_condition(
            self.status["conditions"], type_, status, reason, message, self.search.generation, self.seen.now
        )
        if t:
            self.plan.transitions.append(t)

    def event(self, warning: bool, reason: str, message: str) -> None:
        self.plan.events.append((warning, reason, message))

    def finished(self) -> bool:
        c = self.status["conditions"]
        return cond.is_true(c, cond.SUCCEEDED) or cond.is_true(c, cond.FAILED)

    def active(self) -> list[Record]:
        return [r for r in self.records if r["state"] in records.ACTIVE]

    def stop_job(self, record: Record) -> None:
        job = self.jobs.get(record["index"])
        if job is not None and not job.deleting:
            self.plan.delete.append(job.name)

    def fail(self, reason: str, message: str) -> None:
        for r in self.active():
            records.finish(r, TrialState.CANCELLED, self.now, f"the search failed: {reason}")
            self.stop_job(r)
        self.condition(cond.RUNNING, False, reason, message)
        self.condition(cond.FAILED, True, reason, message)
        self.status["completionTime"] = self.now
        self.status["state"] = "Failed"

    # -- the lifecycle -------------------------------------------------------------------------
    def run(self) -> Plan:
        if self.finished():
            for r in self.records:  # a stop that did not take yet (deleted child still there)
                if r["state"] in ("StoppedEarly", "Cancelled"):
                    self.stop_job(r)
            return self.done()
        self.status.setdefault("startTime", self.now)
        if not cond.is_true(self.status["conditions"], cond.CREATED):
            self.condition(
                cond.CREATED, True, "SearchCreated", f"{self.spec.algorithm.value} search accepted"
            )
            self.status["state"] = "Pending"
        self.status["observedGeneration"] = self.search.generation
        self.adopt()
        for r in self.records:
            self.sync(r)
        if not self.deadline_exceeded():
            self.early_stop()
            if not self.too_many_failures():
                self.schedule()
                if not self.too_many_failures():
                    self.conclude()
        return self.done()

    def done(self) -> Plan:
        self.status["counts"] = records.count(self.records)
        if best := records.best(self.records, self.spec.objective.direction):
            keys = ("name", "index", "parameters", "value")
            self.status["bestTrial"] = {k: copy.deepcopy(best[k]) for k in keys}
        return self.plan

    def adopt(self) -> None:
        """Children the status does not list (status written by an older operator, or restored from
        a backup without status) join it with the values their annotation recorded."""
        known = {r["index"] for r in self.records}
        for index, job in sorted(self.jobs.items()):
            if index not in known and job.parameters is not None:
                self.records.append(records.new(index, job.name, job.parameters, self.now))
        self.records.sort(key=lambda r: r["index"])

    def sync(self, record: Record) -> None:
        """Carry what the trial's job shows into its record."""
        if record["state"] in records.FINISHED:
            if record["state"] in ("StoppedEarly", "Cancelled"):
                self.stop_job(record)
            return
        job = self.jobs.get(record["index"])
        if job is None:
            if "jobState" in record or record["index"] in self.seen.rejected:
                msg = self.seen.rejected.get(record["index"], "its job was deleted while the trial ran")
                records.finish(record, TrialState.FAILED, self.now, msg)
                self.event(True, "TrialFailed", f"{record['name']}: {msg}")
            else:
                self.plan.create.append(record["index"])
            return
        record["jobState"] = job.state or "Pending"
        record["preemptions"] = job.disruptions
        if job.step is not None:
            record["step"] = job.step
        seen = observation(job, self.spec.objective.metric)
        if seen is not None and records.observe(record, seen.step, seen.value, seen.exact):
            self.news.add(record["index"])
        if job.succeeded:
            if seen is None:
                msg = f"training succeeded but reported no {self.spec.objective.metric.value}"
                records.finish(record, TrialState.FAILED, self.now, msg)
                self.event(True, "TrialFailed", f"{record['name']}: {msg}")
                return
            record["value"] = seen.value
            records.finish(record, TrialState.SUCCEEDED, self.now)
            self.event(False, "TrialSucceeded", f"{records.summary(record)}: {seen.value:.6g}")
        elif job.failed:
            records.finish(record, TrialState.FAILED, self.now, job.failure)
            self.event(True, "TrialFailed", f"{record['name']}: {job.failure}")
        elif job.state not in (None, "Pending"):
            record["state"] = "Running"

    def deadline_exceeded(self) -> bool:
        limit = self.spec.deadline_seconds
        if limit is None:
            return False
        elapsed = (self.seen.now - cond.parse_time(self.status["startTime"])).total_seconds()
        if elapsed < limit:
            self.plan.requeue_after = limit - elapsed
            return False
        self.fail("DeadlineExceeded", f"the search ran longer than deadlineSeconds={limit}")
        return True

    def early_stop(self) -> None:
        for r in self.records:
            if r["state"] != "Running" or r["index"] not in self.news:
                continue
            if decision := stopping.judge(self.spec, self.records, r["index"]):
                records.finish(r, TrialState.STOPPED_EARLY, self.now)
                r["stoppedEarly"] = {
                    "rule": decision.rule,
                    "step": decision.step,
                    "message": decision.message,
                }
                self.stop_job(r)
                self.event(False, "TrialStoppedEarly", f"{r['name']}: {decision.message}")

    def too_many_failures(self) -> bool:
        failed = [r for r in self.records if r["state"] == "Failed"]
        limit = self.spec.max_failed_trials
        if len(failed) <= limit:
            return False
        last = failed[-1]
        self.fail(
            "MaxFailedTrialsExceeded",
            f"{len(failed)} trials failed, more than maxFailedTrials={limit}; last: {last['name']}:"
            f" {last.get('message', '')}",
        )
        return True

    def exhausted(self) -> bool:
        planned = self.spec.max_trials
        if self.spec.algorithm == Algorithm.GRID:
            planned = min(planned, space.grid_size(self.spec.parameters))
        return len(self.records) >= planned

    def schedule(self) -> None:
        running = len(self.active())
        while running < self.spec.parallel_trials and not self.exhausted():
            index = max((r["index"] for r in self.records), default=-1) + 1
            try:
                values = sampler.suggest(self.spec, self.records, index)
            except ImportError as exc:
                # GPSampler needs torch and scipy, which a slim operator image may not have.
                algorithm = self.spec.algorithm.value
                self.fail(
                    "AlgorithmUnavailable", f"{algorithm} needs {exc.name} in the operator's environment"
                )
                return
            if values is None:
                return
            record = records.new(index, builders.trial_name(self.search.name, index), values, self.now)
            self.records.append(record)
            try:
                LLMTrainingJobSpec.model_validate(space.trial_spec(self.spec, values))
            except ValidationError as exc:
                # Values valid one by one can still clash (e.g. two sizes that must divide).
                error = exc.errors()[0]
                where = ".".join(str(p) for p in error["loc"]) or "spec"
                msg = f"InvalidParameters: {where}: {error['msg'].removeprefix('Value error, ')}"
                records.finish(record, TrialState.FAILED, self.now, msg)
                self.event(True, "TrialFailed", f"{record['name']}: {msg}")
                continue
            self.plan.create.append(index)
            self.event(False, "TrialCreated", records.summary(record))
            running += 1

    def conclude(self) -> None:
        counts = records.count(self.records)
        best = records.best(self.records, self.spec.objective.direction)
        best_text = f"; best {records.summary(best)} = {best['value']:.6g}" if best else ""
        if self.active() or not self.exhausted():
            self.status["state"] = "Running"
            message = (
                f"{counts['pending']} pending, {counts['running']} running,"
                f" {counts['finished']} of {self.spec.max_trials} finished"
            )
            self.condition(cond.RUNNING, True, "TrialsRunning", message + best_text)
            return
        if best is None:
            self.fail("NoTrialSucceeded", f"all {len(self.records)} trials finished and none succeeded")
            return
        if self.spec.compress_best and not self.best_job_done(best):
            return
        metric = self.spec.objective.metric.value
        message = (
            f"best {records.summary(best)}: {metric} {best['value']:.6g} after {len(self.records)} trials"
        )
        self.condition(cond.RUNNING, False, "SearchSucceeded", message)
        self.condition(cond.SUCCEEDED, True, "BestTrialFound", message)
        self.status["completionTime"] = self.now
        self.status["state"] = "Succeeded"

    def best_job_done(self, best: Record) -> bool:
        """compressBest: the best values trained again with compression; True once it succeeded."""
        name = builders.best_name(self.search.name)
        entry = self.status.setdefault("bestJob", {"name": name, "state": "Pending"})
        job = self.best_job
        self.status["state"] = "Running"
        if job is None:
            if entry["state"] != "Pending":
                self.fail("BestJobDeleted", f"{name} was deleted before it finished")
            else:
                self.plan.create_best = True
                self.condition(
                    cond.RUNNING, True, "TrainingBest", f"training {records.summary(best)} with compression"
                )
            return False
        entry["state"] = job.state or "Pending"
        if job.failed:
            self.fail("BestJobFailed", f"{name}: {job.failure}")
            return False
        if not job.succeeded:
            self.condition(cond.RUNNING, True, "TrainingBest", f"{name} is {entry['state']}")
        return job.succeeded


def plan(search: SearchSnapshot, seen: Observed) -> Plan:
    return _Planner(search, seen).run()


def reject(status: dict[str, Any], generation: int, now: datetime, message: str) -> Plan:
    """A spec the apiserver admitted but the operator cannot run (e.g. a trial that would not be a
    valid LLMTrainingJob at a parameter's extreme): Failed, with the reason in the condition."""
    out = Plan(status=copy.deepcopy(status))
    conditions = out.status.setdefault("conditions", [])
    for type_, value, reason, text in (
        (cond.CREATED, True, "SearchCreated", "search received"),
        (cond.RUNNING, False, "InvalidSpec", message),
        (cond.FAILED, True, "InvalidSpec", message),
    ):
        if t := cond.set_condition(conditions, type_, value, reason, text, generation, now):
            out.transitions.append(t)
    out.status.setdefault("startTime", cond.now_iso(now))
    out.status.setdefault("completionTime", cond.now_iso(now))
    out.status.update(state="Failed", observedGeneration=generation)
    return out
