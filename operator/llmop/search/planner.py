"""The decision for one search: from its spec, last status and child jobs, what to do next.

Pure and synchronous (the samplers are seeded per trial, see ``sampler``), so it is unit-tested
without a cluster. The controller writes the planned status *before* it creates the planned trials:
a trial exists in status before its job exists, so a crash in between re-creates the same job (same
name and values) instead of sampling a new one, and a result, once in status, is never lost.

A pass runs its phases in order over one shared ``context.Pass``: bookkeeping (``trials``), the
failure policy and outcome (``conclusion``), early stopping (``stopping``), new trials
(``schedule``).
"""

from __future__ import annotations

from datetime import datetime

from llmop import conditions as cond
from llmop.search import conclusion, schedule, stopping, trials
from llmop.search.context import Observed, Pass, Plan, SearchSnapshot
from llmop_contract.api.v1alpha1.search_status import (
    LLMHyperparameterSearchStatus,
    SearchReason,
    SearchState,
)

__all__ = ["Observed", "Plan", "SearchSnapshot", "plan", "reject"]


def plan(search: SearchSnapshot, seen: Observed) -> Plan:
    p = Pass(search, seen)
    if p.finished():
        for r in p.records:
            p.restop(r)
        return _done(p)
    if p.status.start_time is None:
        p.status.start_time = p.now
    if not cond.holds(p.status.conditions, cond.CREATED):
        message = f"{p.spec.algorithm.value} search accepted"
        p.condition(cond.CREATED, True, SearchReason.SEARCH_CREATED, message)
        p.status.state = SearchState.PENDING
    p.status.observed_generation = search.generation
    trials.adopt(p)
    trials.sync_all(p)
    if not conclusion.deadline_exceeded(p):
        stopping.stop_behind(p)
        if not conclusion.too_many_failures(p):
            schedule.schedule(p)
            if not conclusion.too_many_failures(p):
                conclusion.conclude(p)
    return _done(p)


def _done(p: Pass) -> Plan:
    conclusion.summarise(p)
    return p.plan


def reject(status: LLMHyperparameterSearchStatus, generation: int, now: datetime, message: str) -> Plan:
    """A spec the apiserver admitted but the operator cannot run (e.g. a trial that would not be a
    valid LLMTrainingJob at a parameter's extreme): Failed, with the reason in the condition."""
    out = Plan(status=status.model_copy(deep=True))
    conditions = out.status.conditions
    for type_, value, reason, text in (
        (cond.CREATED, True, SearchReason.SEARCH_CREATED, "search received"),
        (cond.RUNNING, False, SearchReason.INVALID_SPEC, message),
        (cond.FAILED, True, SearchReason.INVALID_SPEC, message),
    ):
        if t := cond.set_condition(conditions, type_, value, reason, text, generation, now):
            out.transitions.append(t)
    out.status.start_time = out.status.start_time or cond.now_iso(now)
    out.status.completion_time = out.status.completion_time or cond.now_iso(now)
    out.status.state, out.status.observed_generation = SearchState.FAILED, generation
    return out
