"""The search space: Optuna distributions, the grid, and the trial spec a set of values gives."""

from __future__ import annotations

import copy
import math
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from llmop_contract.api.v1alpha1 import tunable
from llmop_contract.api.v1alpha1.search import (
    LLMHyperparameterSearchSpec,
    Parameter,
    ParameterType,
    Scale,
    trial_base,
)

Values = dict[str, Any]  # parameter name -> value, typed like the field it is written to


def choices(p: Parameter) -> list[Any]:
    return [tunable.convert(p.path, c) for c in p.choices]


def distribution(p: Parameter) -> BaseDistribution:
    log = p.scale == Scale.LOG
    if p.type == ParameterType.CATEGORICAL:
        return CategoricalDistribution(choices(p))
    assert p.min is not None and p.max is not None
    if p.type == ParameterType.INT:
        # Optuna allows a step only on a linear integer scale; a Log step is a Grid ratio.
        step = 1 if log or p.step is None else int(p.step)
        return IntDistribution(int(p.min), int(p.max), log=log, step=step)
    return FloatDistribution(p.min, p.max, log=log, step=None if log else p.step)


def distributions(parameters: list[Parameter]) -> dict[str, BaseDistribution]:
    return {p.name: distribution(p) for p in parameters}


def _round(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


def normalize(parameters: list[Parameter], values: Values) -> Values:
    """Sampled values as recorded: continuous floats to 6 significant digits, kept inside the range.

    Readable in status and names, and still exactly what the trial ran with: the rounded value is
    the one written into the trial's spec and replayed into the sampler.
    """
    out: Values = {}
    for p in parameters:
        value = values[p.name]
        if p.type == ParameterType.FLOAT and p.step is None:
            assert p.min is not None and p.max is not None
            value = min(max(_round(float(value), 6), p.min), p.max)
        out[p.name] = value
    return out


def axis(p: Parameter) -> list[Any]:
    """The values Grid visits for one parameter, in order."""
    if p.type == ParameterType.CATEGORICAL:
        return choices(p)
    assert p.min is not None and p.max is not None
    lo, hi = p.min, p.max
    if p.scale == Scale.LOG and p.step is not None:
        # A Log step is a ratio: min, min*step, min*step^2, ... up to max.
        count = math.floor(math.log(hi / lo) / math.log(p.step) + 1e-9) + 1
        raw = [lo * p.step**k for k in range(count)]
    else:
        step = p.step if p.step is not None else 1.0
        count = math.floor((hi - lo) / step + 1e-9) + 1
        raw = [lo + k * step for k in range(count)]
    if p.type == ParameterType.INT:
        return sorted({round(v) for v in raw})
    return [_round(v, 12) for v in raw]


def grid_size(parameters: list[Parameter]) -> int:
    return math.prod(len(axis(p)) for p in parameters)


def grid_point(parameters: list[Parameter], index: int) -> Values | None:
    """The index-th point of the grid, the last parameter varying fastest (nested loops in listed
    order); None past the end. A pure function of the index, so a restarted operator recomputes
    exactly the point it had chosen."""
    axes = [axis(p) for p in parameters]
    if index >= math.prod(len(a) for a in axes):
        return None
    out: Values = {}
    for p, values in zip(reversed(parameters), reversed(axes), strict=True):
        index, position = divmod(index, len(values))
        out[p.name] = values[position]
    return {p.name: out[p.name] for p in parameters}


def trial_spec(
    spec: LLMHyperparameterSearchSpec, values: Values, keep_lifecycle: bool = False
) -> dict[str, Any]:
    """The LLMTrainingJob spec of a trial: the template with each value written at its path.

    Trials train only; ``keep_lifecycle`` keeps compression and serving (the compressBest job).
    """
    wire = copy.deepcopy(spec.trial_template.to_wire() if keep_lifecycle else trial_base(spec.trial_template))
    for p in spec.parameters:
        tunable.apply(wire, p.path, values[p.name])
    return wire
