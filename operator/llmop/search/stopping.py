"""Early stopping: should a running trial stop, judged by Optuna's pruners on the recorded history.

Optuna's pruners expect a live study in which ``trial.report(value, step)`` is followed by
``should_prune()``. Here the study is rebuilt from status for each judgement, with the judged trial
last. SuccessiveHalving keeps per-trial "rung" values in Optuna's storage; those are recomputed from
the recorded intermediate values (a rung's value is the first one reported at or after its step,
which is what Optuna itself stores when it is asked after every report).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optuna.pruners import BasePruner, MedianPruner, SuccessiveHalvingPruner

from llmop.search import study
from llmop.search.context import Pass
from llmop.search.records import finish
from llmop_contract.api.v1alpha1.search import (
    Direction,
    EarlyStopping,
    EarlyStoppingRule,
    LLMHyperparameterSearchSpec,
)
from llmop_contract.api.v1alpha1.search_status import EarlyStop, TrialEvent, TrialState, TrialStatus


@dataclass(frozen=True)
class Decision:
    rule: str
    step: int
    message: str


def _pruner(es: EarlyStopping) -> BasePruner:
    if es.rule == EarlyStoppingRule.SUCCESSIVE_HALVING:
        return SuccessiveHalvingPruner(min_resource=es.min_steps, reduction_factor=es.reduction_factor)
    return MedianPruner(n_startup_trials=es.startup_trials, n_warmup_steps=es.min_steps)


def rung_values(values: dict[int, float], es: EarlyStopping, before: int | None = None) -> dict[str, Any]:
    """Optuna's ``completed_rung_<k>`` attributes of a trial that reported ``values`` (steps < before)."""
    attrs: dict[str, Any] = {}
    rung = 0
    for step in sorted(values):
        if before is not None and step >= before:
            break
        while step >= es.min_steps * es.reduction_factor**rung:
            attrs[f"completed_rung_{rung}"] = values[step]
            rung += 1
    return attrs


def settled(record: TrialStatus) -> TrialStatus:
    """The record with only the values that can no longer change.

    A running trial's latest value may have been read between the trainer moving its step counter
    to an evaluation step and that evaluation finishing (it then shows the previous evaluation's
    loss, corrected by the next read). Judging one evaluation later costs a little time and never
    stops a good trial on such a reading.
    """
    if record.state != TrialState.RUNNING or not record.intermediate_values:
        return record
    return record.model_copy(update={"intermediate_values": record.intermediate_values[:-1]})


def judge(spec: LLMHyperparameterSearchSpec, records: Sequence[TrialStatus], index: int) -> Decision | None:
    """A Decision to stop trial ``index`` at its latest settled value, or None to let it run."""
    es = spec.early_stopping
    records = [settled(r) for r in records]
    target = next((r for r in records if r.index == index), None)
    if es is None or target is None or not (values := study.intermediate(target)):
        return None
    last = max(values)

    def attrs(record: TrialStatus) -> dict[str, Any]:
        if es.rule != EarlyStoppingRule.SUCCESSIVE_HALVING:
            return {}
        mine = record.index == index
        return rung_values(study.intermediate(record), es, before=last if mine else None)

    # Every other trial is replayed: Median reads only the succeeded ones, SuccessiveHalving ranks
    # against every trial that reached a rung, running ones included (asynchronous halving).
    others = [r for r in records if r.index != index]
    pruner = _pruner(es)
    replayed = study.build(spec, [*others, target], pruner=pruner, system_attrs=attrs)
    judged = replayed.get_trials(deepcopy=False)[-1]
    if judged.number != len(replayed.trials) - 1 or judged.intermediate_values != values:
        return None  # the target could not be replayed (values outside the current space)
    if not pruner.prune(replayed, judged):
        return None
    return Decision(es.rule.value, last, _explain(spec, records, index, values[last], last))


def _explain(
    spec: LLMHyperparameterSearchSpec, records: Sequence[TrialStatus], index: int, value: float, step: int
) -> str:
    metric = spec.objective.metric.value
    es = spec.early_stopping
    assert es is not None
    if es.rule == EarlyStoppingRule.MEDIAN:
        peers = [
            v
            for r in records
            if r.state == TrialState.SUCCEEDED and (v := study.intermediate(r).get(step)) is not None
        ]
        median = f" ({statistics.median(peers):.4g})" if peers else ""
        worse = "higher" if spec.objective.direction == Direction.MINIMIZE else "lower"
        return (
            f"{metric} {value:.4g} at step {step} is {worse} than the median of the succeeded trials"
            f" at that step{median}"
        )
    return (
        f"{metric} {value:.4g} at step {step} is not in the best 1/{es.reduction_factor} of the trials"
        " that reached this rung"
    )


def stop_behind(p: Pass) -> None:
    """The early-stopping phase: stop each running trial with news that ``judge`` finds behind."""
    for r in p.records:
        if r.state != TrialState.RUNNING or r.index not in p.news:
            continue
        if decision := judge(p.spec, p.records, r.index):
            finish(r, TrialState.STOPPED_EARLY, p.now)
            r.stopped_early = EarlyStop(rule=decision.rule, step=decision.step, message=decision.message)
            p.stop_job(r)
            p.event(False, TrialEvent.STOPPED_EARLY, f"{r.name}: {decision.message}")
