"""The LLMHyperparameterSearch kind: trials of a template LLMTrainingJob over a parameter space.

Each trial is an ordinary LLMTrainingJob owned by the search: the template with the trial's parameter
values written at their paths. The rules below reject at admission what could never run (a path the
template does not have, an empty range, a log range through zero, a grid with no step, ...).
"""

from __future__ import annotations

import copy
import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, ValidationError, WithJsonSchema, model_validator

from llmop_contract.api.base import ApiModel, Rule
from llmop_contract.api.v1alpha1 import tunable
from llmop_contract.api.v1alpha1.job import (
    MAX_NAME_LENGTH,
    LLMTrainingJobSpec,
    derived_name_problem,
    name_rule,
)

KIND = "LLMHyperparameterSearch"
PLURAL = "llmhyperparametersearches"
SINGULAR = "llmhyperparametersearch"
SHORT_NAMES = ("llmsearch", "hpsearch")
CATEGORIES = ("llmop", "all")

# Trials are named "<search>-NNN" and the compressed best "<search>-best", within the job name limit.
MAX_SEARCH_NAME_LENGTH = MAX_NAME_LENGTH - len("-best")
MAX_TRIALS = 500
# A name that passes the job's own name rule gives trial names that pass it too: "-NNN" and "-best"
# keep a DNS-1035 label one (tests/unit/test_derived_names.py checks every trial index).
SEARCH_CHILDREN = (
    "the trial LLMTrainingJobs <name>-NNN and <name>-best, and through them their Services and pods"
)
SEARCH_NAME_RULE = name_rule(SEARCH_CHILDREN)


def search_name_problem(name: str) -> str | None:
    """Why an LLMHyperparameterSearch cannot be called ``name`` (a trial would be invalid), or None."""
    return derived_name_problem(name, MAX_SEARCH_NAME_LENGTH, SEARCH_CHILDREN)


# A parameter value in status and annotations: any JSON scalar, typed by the field it lands in.
Value = Annotated[str | int | float | bool, WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True})]


class ParameterType(StrEnum):
    FLOAT = "Float"
    INT = "Int"
    CATEGORICAL = "Categorical"


class Scale(StrEnum):
    LINEAR = "Linear"
    LOG = "Log"


def _whole(value: float | None) -> bool:
    return value is None or float(value).is_integer()


_LOWER, _UPPER = tunable.cel_bounds("lower"), tunable.cel_bounds("upper")
# Listed by what they are not, so an unknown path draws only the path rule's message.
_NOT_FLOAT = tuple(p for p in tunable.PATHS if p not in tunable.FLOAT_PATHS)
_NOT_NUMERIC = tuple(p for p in tunable.PATHS if p not in tunable.NUMERIC_PATHS)
_NUMBER = r"^[-+]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][-+]?[0-9]+)?$"


class Parameter(ApiModel):
    """One dimension of the search space, written into every trial's spec at ``path``."""

    rules = (
        Rule(
            f"self.path in {tunable.cel_list(tunable.PATHS)}",
            lambda m: m.path in tunable.LEAVES,
            "path must name a scalar field of the LLMTrainingJob spec, e.g. training.optimizer.learningRate"
            " (compression and serving are not tunable)",
            ".path",
        ),
        Rule(
            f"self.type != 'Float' || !(self.path in {tunable.cel_list(_NOT_FLOAT)})",
            lambda m: m.type != ParameterType.FLOAT or m.path not in _NOT_FLOAT,
            "a Float parameter needs a floating-point field; use Int or Categorical for this path",
            ".type",
        ),
        Rule(
            f"self.type != 'Int' || !(self.path in {tunable.cel_list(_NOT_NUMERIC)})",
            lambda m: m.type != ParameterType.INT or m.path not in _NOT_NUMERIC,
            "an Int parameter needs a numeric field; use Categorical for this path",
            ".type",
        ),
        Rule(
            "self.type == 'Categorical' || (has(self.min) && has(self.max))",
            lambda m: m.type == ParameterType.CATEGORICAL or (m.min is not None and m.max is not None),
            "Float and Int parameters need min and max",
            ".min",
        ),
        Rule(
            "!has(self.min) || !has(self.max) || self.min < self.max",
            lambda m: m.min is None or m.max is None or m.min < m.max,
            "min must be less than max (an empty range)",
            ".max",
        ),
        Rule(
            "self.scale != 'Log' || !has(self.min) || self.min > 0.0",
            lambda m: m.scale != Scale.LOG or m.min is None or m.min > 0,
            "a Log scale needs min > 0",
            ".min",
        ),
        Rule(
            "self.scale != 'Log' || !has(self.step) || self.step > 1.0",
            lambda m: m.scale != Scale.LOG or m.step is None or m.step > 1,
            "on a Log scale step is the ratio between neighbouring grid points and must be greater than 1",
            ".step",
        ),
        Rule(
            "self.type != 'Int' || ((!has(self.min) || self.min == double(int(self.min)))"
            " && (!has(self.max) || self.max == double(int(self.max)))"
            " && (!has(self.step) || self.step == double(int(self.step))))",
            lambda m: m.type != ParameterType.INT or all(_whole(v) for v in (m.min, m.max, m.step)),
            "an Int parameter needs whole-number min, max and step",
            ".min",
        ),
        Rule(
            "self.type == 'Categorical' ? has(self.choices) && size(self.choices) > 0"
            " && !has(self.min) && !has(self.max) && !has(self.step)"
            " : !has(self.choices) || size(self.choices) == 0",
            lambda m: (
                bool(m.choices) and m.min is None and m.max is None and m.step is None
                if m.type == ParameterType.CATEGORICAL
                else not m.choices
            ),
            "a Categorical parameter needs choices (and no min, max or step); Float and Int take no choices",
            ".choices",
        ),
        Rule(
            f"!has(self.choices) || !(self.path in {tunable.cel_list(tunable.NUMERIC_PATHS)})"
            f" || self.choices.all(c, c.matches('{_NUMBER}'))",
            lambda m: m.path not in tunable.NUMERIC_PATHS or all(re.match(_NUMBER, c) for c in m.choices),
            'choices of a numeric field must be numbers written as strings, e.g. "64" or "0.001"',
            ".choices",
        ),
        Rule(
            f"!has(self.choices) || !(self.path in {tunable.cel_list(tunable.BOOL_PATHS)})"
            " || self.choices.all(c, c == 'true' || c == 'false')",
            lambda m: m.path not in tunable.BOOL_PATHS or all(c in ("true", "false") for c in m.choices),
            'choices of a boolean field must be "true" or "false"',
            ".choices",
        ),
        Rule(
            f"!has(self.min) || !(self.path in {_LOWER}) || ({_LOWER}[self.path][1] == 1.0"
            f" ? self.min > {_LOWER}[self.path][0] : self.min >= {_LOWER}[self.path][0])",
            lambda m: m.min is None or tunable.within_lower(m.path, m.min),
            "min is below the smallest value the target field accepts",
            ".min",
        ),
        Rule(
            f"!has(self.max) || !(self.path in {_UPPER}) || ({_UPPER}[self.path][1] == 1.0"
            f" ? self.max < {_UPPER}[self.path][0] : self.max <= {_UPPER}[self.path][0])",
            lambda m: m.max is None or tunable.within_upper(m.path, m.max),
            "max is above the largest value the target field accepts",
            ".max",
        ),
    )

    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z][A-Za-z0-9_.-]*$")
    """Name of the parameter in status, metrics and the trial's llmop.io/trial-parameters annotation."""
    path: str = Field(min_length=1, max_length=256)
    """Dotted camelCase path of the trialTemplate field the value is written to, e.g. training.optimizer.learningRate."""
    type: ParameterType
    """Float (continuous), Int (whole numbers) or Categorical (one of choices)."""
    min: float | None = None
    """Smallest value (Float, Int)."""
    max: float | None = None
    """Largest value (Float, Int)."""
    scale: Scale = Scale.LINEAR
    """Linear samples uniformly; Log samples uniformly in the logarithm (learning rates, weight decay)."""
    step: float | None = Field(None, gt=0)
    """Grid spacing: the difference between neighbouring values on a Linear scale, their ratio on a Log scale. Required by Grid for Float parameters; Int parameters default to 1."""
    choices: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=256)
    """Values of a Categorical parameter, in the order Grid visits them; strings, as in Katib, converted to the target field's type ("64" for an integer field, "true" for a boolean)."""


class Algorithm(StrEnum):
    GRID = "Grid"
    RANDOM = "Random"
    TPE = "TPE"
    GAUSSIAN_PROCESS = "GaussianProcess"


class ObjectiveMetric(StrEnum):
    VALIDATION_LOSS = "ValidationLoss"
    TRAINING_LOSS = "TrainingLoss"


class Direction(StrEnum):
    MINIMIZE = "Minimize"
    MAXIMIZE = "Maximize"


class Objective(ApiModel):
    """What a trial is scored by."""

    metric: ObjectiveMetric = ObjectiveMetric.VALIDATION_LOSS
    """ValidationLoss (the trainer's final evaluation) or TrainingLoss (the last logged training loss)."""
    direction: Direction = Direction.MINIMIZE
    """Whether lower or higher values are better."""


class EarlyStoppingRule(StrEnum):
    MEDIAN = "Median"
    SUCCESSIVE_HALVING = "SuccessiveHalving"


class EarlyStopping(ApiModel):
    """Stop trials whose intermediate objective values fall behind (Optuna's pruners)."""

    rules = (
        Rule(
            "self.rule != 'SuccessiveHalving' || self.minSteps >= 1",
            lambda m: m.rule != EarlyStoppingRule.SUCCESSIVE_HALVING or m.min_steps >= 1,
            "SuccessiveHalving needs minSteps >= 1 (the step of its first rung)",
            ".minSteps",
        ),
    )

    rule: EarlyStoppingRule
    """Median stops a trial worse than the median of finished trials at the same step; SuccessiveHalving keeps the best 1/reductionFactor at steps minSteps x reductionFactor^k."""
    min_steps: int = Field(0, ge=0, le=1_000_000_000)
    """No trial is stopped before this step (warm-up); for SuccessiveHalving the first rung."""
    startup_trials: int = Field(3, ge=0, le=MAX_TRIALS)
    """Median: trials that must have succeeded before any trial is compared with them."""
    reduction_factor: int = Field(3, ge=2, le=16)
    """SuccessiveHalving: 1/reductionFactor of the trials reaching a rung continue past it."""


class LLMHyperparameterSearchSpec(ApiModel):
    """Desired state of an LLMHyperparameterSearch."""

    rules = (
        Rule(
            "self.parallelTrials <= self.maxTrials",
            lambda m: m.parallel_trials <= m.max_trials,
            "parallelTrials must not exceed maxTrials",
            ".parallelTrials",
        ),
        Rule(
            "self.parameters.all(p, self.parameters.exists_one(q, q.name == p.name))",
            lambda m: len({p.name for p in m.parameters}) == len(m.parameters),
            "parameter names must be unique",
            ".parameters",
        ),
        Rule(
            "self.parameters.all(p, self.parameters.exists_one(q, q.path == p.path))",
            lambda m: len({p.path for p in m.parameters}) == len(m.parameters),
            "two parameters set the same path",
            ".parameters",
        ),
        Rule(
            "self.algorithm != 'Grid' || self.parameters.all(p, p.type != 'Float' || has(p.step))",
            lambda m: (
                m.algorithm != Algorithm.GRID
                or all(p.type != ParameterType.FLOAT or p.step is not None for p in m.parameters)
            ),
            "Grid needs a step on every Float parameter",
            ".algorithm",
        ),
        Rule(
            "self.algorithm == 'Grid' || self.parameters.all(p, p.scale != 'Log' || !has(p.step))",
            lambda m: (
                m.algorithm == Algorithm.GRID
                or all(p.scale != Scale.LOG or p.step is None for p in m.parameters)
            ),
            "step on a Log-scale parameter is used only by Grid",
            ".algorithm",
        ),
        Rule(
            # Recorded trials are replayed into the sampler: the space they were drawn from must stay.
            "self.trialTemplate == oldSelf.trialTemplate && self.parameters == oldSelf.parameters"
            " && self.objective == oldSelf.objective && self.algorithm == oldSelf.algorithm"
            " && self.seed == oldSelf.seed",
            lambda m: True,  # a transition rule: only the apiserver sees the old object
            "trialTemplate, parameters, objective, algorithm and seed cannot change; create a new search",
            ".parameters",
        ),
        Rule(
            "!self.compressBest || has(self.trialTemplate.compression)",
            lambda m: not m.compress_best or m.trial_template.compression is not None,
            "compressBest needs trialTemplate.compression",
            ".compressBest",
        ),
    )

    trial_template: LLMTrainingJobSpec
    """A complete LLMTrainingJob spec; each trial is this spec with the parameters' values written at their paths (compression and serving removed, see compressBest)."""
    parameters: list[Parameter] = Field(min_length=1, max_length=16)
    """The search space."""
    objective: Objective = Field(default_factory=Objective)
    """What the search optimises."""
    algorithm: Algorithm = Algorithm.TPE
    """Grid (every point in order), Random, TPE or GaussianProcess (Bayesian, Optuna's samplers)."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """Seed of the samplers: the same seed and results give the same trials."""
    random_startup_trials: int = Field(5, ge=1, le=MAX_TRIALS)
    """TPE and GaussianProcess: trials sampled at random before the model guides sampling."""
    max_trials: int = Field(10, ge=1, le=MAX_TRIALS)
    """Trials to run in total (Grid stops earlier when its grid is exhausted)."""
    parallel_trials: int = Field(1, ge=1, le=64)
    """Trials running at the same time."""
    max_failed_trials: int = Field(3, ge=0, le=MAX_TRIALS)
    """The search fails when more trials than this have failed (preempted trials restart and do not count)."""
    early_stopping: EarlyStopping | None = None
    """Stop unpromising trials early; unset lets every trial run to the end."""
    deadline_seconds: int | None = Field(None, ge=1)
    """Fail the search (DeadlineExceeded) and stop its running trials this long after it started."""
    compress_best: bool = False
    """After the last trial, train the best parameters once more with trialTemplate.compression (and serving) kept, as the job <search>-best."""

    @model_validator(mode="after")
    def _trials_are_valid_jobs(self) -> LLMHyperparameterSearchSpec:
        """Every parameter's extreme values must give an LLMTrainingJob spec the apiserver admits."""
        base = trial_base(self.trial_template)
        for p in self.parameters:
            for value in extremes(p):
                spec = copy.deepcopy(base)
                tunable.apply(spec, p.path, value)
                try:
                    LLMTrainingJobSpec.model_validate(spec)
                except ValidationError as exc:
                    error = exc.errors()[0]
                    where = ".".join(str(part) for part in error["loc"]) or "spec"
                    raise ValueError(
                        f"parameter {p.name}: {p.path}={value!r} gives an invalid trial ({where}: {error['msg'].removeprefix('Value error, ')})"
                    ) from None
        return self


def trial_base(template: LLMTrainingJobSpec) -> dict[str, Any]:
    """The template in manifest form without compression and serving, which trials skip."""
    wire = template.to_wire()
    wire.pop("compression", None)
    wire.pop("serving", None)
    return wire


def extremes(p: Parameter) -> list[Any]:
    """The values that bound what a parameter can produce: its choices, or min and max."""
    if p.type == ParameterType.CATEGORICAL:
        return [tunable.convert(p.path, c) for c in p.choices]
    assert p.min is not None and p.max is not None
    if p.type == ParameterType.INT:
        return [int(p.min), int(p.max)]
    return [p.min, p.max]
