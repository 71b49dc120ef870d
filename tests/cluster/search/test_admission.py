"""Bad searches are rejected by the real apiserver, naming the field; the models reject the same."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from llmop_contract.api.v1alpha1.search import LLMHyperparameterSearchSpec
from tests.admission import assert_models_reject
from tests.kube import Cluster

REPO = Path(__file__).resolve().parents[3]
Manifest = dict[str, Any]
LR = {
    "name": "lr",
    "path": "training.optimizer.learningRate",
    "type": "Float",
    "min": 1e-5,
    "max": 1.0,
    "scale": "Log",
}


def base() -> Manifest:
    return {
        "apiVersion": "llmop.io/v1alpha1",
        "kind": "LLMHyperparameterSearch",
        "metadata": {"name": "bad"},
        "spec": {
            "trialTemplate": {
                "data": {"sources": [{"uri": "builtin://english"}]},
                "training": {"maxSteps": 100},
            },
            "parameters": [copy.deepcopy(LR)],
        },
    }


def param(**changes: Any) -> Callable[[Manifest], None]:
    def apply(m: Manifest) -> None:
        p = m["spec"]["parameters"][0]
        for key, value in changes.items():
            if value is None:
                p.pop(key, None)
            else:
                p[key] = value

    return apply


def spec(**changes: Any) -> Callable[[Manifest], None]:
    def apply(m: Manifest) -> None:
        m["spec"].update(changes)

    return apply


WD = {"name": "wd", "path": "training.optimizer.weightDecay", "type": "Float", "min": 0.0, "max": 0.3}

# (case id, change to a valid manifest, text the rejection must contain)
CASES: list[tuple[str, Callable[[Manifest], None], str]] = [
    ("path the template does not have", param(path="training.optimizer.lr"), "spec.parameters[0].path"),
    (
        "path into compression (not tunable)",
        param(path="compression.selection.objective"),
        "spec.parameters[0].path",
    ),
    (
        "Float on an integer field",
        param(path="training.maxSteps", min=10.0, max=100.0, scale="Linear"),
        "spec.parameters[0].type",
    ),
    (
        "Int on an enum field",
        param(path="training.precision", type="Int", min=1.0, max=2.0, scale="Linear"),
        "spec.parameters[0].type",
    ),
    ("empty range", param(min=0.1, max=0.01), "spec.parameters[0].max"),
    ("Log scale through zero", param(min=0.0), "spec.parameters[0].min"),
    ("max beyond the field's bound", param(max=20.0), "spec.parameters[0].max"),
    (
        "min at an exclusive bound",
        param(path="data.sharding.validationFraction", min=0.0, max=0.3, scale="Linear"),
        "spec.parameters[0].min",
    ),
    ("Float without min", param(min=None), "spec.parameters[0].min"),
    (
        "Int with a fractional bound",
        param(path="model.numLayers", type="Int", min=1.5, max=4.0, scale="Linear"),
        "spec.parameters[0].min",
    ),
    (
        "Categorical without choices",
        param(type="Categorical", min=None, max=None, scale=None),
        "spec.parameters[0].choices",
    ),
    (
        "Categorical with a range",
        param(type="Categorical", choices=["0.001", "0.01"]),
        "spec.parameters[0].choices",
    ),
    ("Float with choices", param(choices=["0.1"]), "spec.parameters[0].choices"),
    (
        "numeric choices that are not numbers",
        param(path="model.numLayers", type="Categorical", choices=["two"], min=None, max=None, scale=None),
        "spec.parameters[0].choices",
    ),
    ("Log step that is not a ratio", param(step=0.5), "spec.parameters[0].step"),
    ("Log step outside Grid", param(step=10.0), "spec.algorithm"),
    ("Grid Float without step", spec(algorithm="Grid"), "spec.algorithm"),
    ("duplicate parameter names", spec(parameters=[LR, {**WD, "name": "lr"}]), "spec.parameters"),
    ("two parameters on one path", spec(parameters=[LR, {**LR, "name": "lr2"}]), "spec.parameters"),
    ("parallelTrials above maxTrials", spec(maxTrials=4, parallelTrials=5), "spec.parallelTrials"),
    ("maxTrials above the limit", spec(maxTrials=501), "spec.maxTrials"),
    ("unknown algorithm", spec(algorithm="Hyperband"), "spec.algorithm"),
    ("unknown objective metric", spec(objective={"metric": "Accuracy"}), "spec.objective.metric"),
    ("no parameters", spec(parameters=[]), "spec.parameters"),
    (
        "SuccessiveHalving without a first rung",
        spec(earlyStopping={"rule": "SuccessiveHalving"}),
        "spec.earlyStopping.minSteps",
    ),
    ("compressBest without compression", spec(compressBest=True), "spec.compressBest"),
    (
        "invalid template (both maxSteps and maxTokens)",
        spec(
            trialTemplate={
                "data": {"sources": [{"uri": "builtin://english"}]},
                "training": {"maxSteps": 1, "maxTokens": 9},
            }
        ),
        "spec.trialTemplate.training.maxSteps",
    ),
    ("unknown field (strict)", param(scaling="Log"), "spec.parameters[0].scaling"),
    ("name too long for trial names", lambda m: m["metadata"].update(name="s" * 36), "metadata.name"),
    # A valid object name whose trials ("lr.search-001") would not be admissible job names.
    ("dot in the name", lambda m: m["metadata"].update(name="lr.search"), "trial LLMTrainingJobs"),
    ("leading digit in the name", lambda m: m["metadata"].update(name="1search"), "trial LLMTrainingJobs"),
]


def _create(cluster: Cluster, namespace: str, manifest: Manifest) -> tuple[int, str]:
    proc = cluster.kubectl(
        "create", "--validate=strict", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False
    )
    return proc.returncode, " ".join(proc.stderr.split())


@pytest.mark.cluster
@pytest.mark.parametrize(("case", "change", "field"), CASES, ids=[c[0] for c in CASES])
def test_bad_search_rejected_naming_the_field(
    cluster: Cluster, namespace: str, case: str, change: Callable[[Manifest], None], field: str
) -> None:
    manifest = base()
    change(manifest)
    code, message = _create(cluster, namespace, manifest)
    print(f"\n[{case}] {message}")
    assert code != 0, f"{case}: the apiserver accepted it"
    assert field in message, f"{case}: rejection does not name {field}: {message}"
    assert "bad" not in cluster.kubectl("get", "llmsearch", "-n", namespace, "-o", "name").stdout


SPEC_CASES = [c for c in CASES if c[2].startswith("spec.")]

# What the models say for each spec case: where (the error's loc, as a path under spec) and a
# fragment of the message. A parameter's own rules are a validator on the parameter, so their loc is
# spec.parameters[0] and the message names the field; a loc is always the apiserver's field or above it.
PARAMETER = "spec.parameters[0]"
MODEL_ERRORS: dict[str, tuple[str, str]] = {
    "path the template does not have": (PARAMETER, "path must name a scalar field of the LLMTrainingJob"),
    "path into compression (not tunable)": (
        PARAMETER,
        "path must name a scalar field of the LLMTrainingJob",
    ),
    "Float on an integer field": (PARAMETER, "a Float parameter needs a floating-point field"),
    "Int on an enum field": (PARAMETER, "an Int parameter needs a numeric field"),
    "empty range": (PARAMETER, "min must be less than max"),
    "Log scale through zero": (PARAMETER, "a Log scale needs min > 0"),
    "max beyond the field's bound": (PARAMETER, "max is above the largest value the target field accepts"),
    "min at an exclusive bound": (PARAMETER, "min is below the smallest value the target field accepts"),
    "Float without min": (PARAMETER, "Float and Int parameters need min and max"),
    "Int with a fractional bound": (PARAMETER, "an Int parameter needs whole-number min, max and step"),
    "Categorical without choices": (PARAMETER, "a Categorical parameter needs choices"),
    "Categorical with a range": (PARAMETER, "a Categorical parameter needs choices"),
    "Float with choices": (PARAMETER, "Float and Int take no choices"),
    "numeric choices that are not numbers": (
        PARAMETER,
        "choices of a numeric field must be numbers written as strings",
    ),
    "Log step that is not a ratio": (PARAMETER, "on a Log scale step is the ratio"),
    "Log step outside Grid": ("spec", "step on a Log-scale parameter is used only by Grid"),
    "Grid Float without step": ("spec", "Grid needs a step on every Float parameter"),
    "duplicate parameter names": ("spec", "parameter names must be unique"),
    "two parameters on one path": ("spec", "two parameters set the same path"),
    "parallelTrials above maxTrials": ("spec", "parallelTrials must not exceed maxTrials"),
    "maxTrials above the limit": ("spec.maxTrials", "less than or equal to 500"),
    "unknown algorithm": ("spec.algorithm", "'Grid', 'Random', 'TPE' or 'GaussianProcess'"),
    "unknown objective metric": ("spec.objective.metric", "'ValidationLoss' or 'TrainingLoss'"),
    "no parameters": ("spec.parameters", "at least 1 item"),
    "SuccessiveHalving without a first rung": ("spec.earlyStopping", "SuccessiveHalving needs minSteps >= 1"),
    "compressBest without compression": ("spec", "compressBest needs trialTemplate.compression"),
    "invalid template (both maxSteps and maxTokens)": (
        "spec.trialTemplate.training",
        "exactly one of maxSteps or maxTokens must be set",
    ),
    "unknown field (strict)": ("spec.parameters[0].scaling", "Extra inputs are not permitted"),
}


def test_every_spec_case_says_what_the_models_report() -> None:
    assert sorted(MODEL_ERRORS) == sorted(c[0] for c in SPEC_CASES)


@pytest.mark.parametrize(("case", "change", "field"), SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_models_reject_the_same(case: str, change: Callable[[Manifest], None], field: str) -> None:
    manifest = base()
    change(manifest)
    assert_models_reject(LLMHyperparameterSearchSpec, manifest["spec"], case, *MODEL_ERRORS[case], field)


def test_the_base_search_is_valid() -> None:
    LLMHyperparameterSearchSpec.model_validate(base()["spec"])


@pytest.mark.cluster
def test_the_search_space_cannot_change_after_creation(cluster: Cluster, namespace: str) -> None:
    manifest = base()
    manifest["metadata"]["name"] = "fixed"
    code, message = _create(cluster, namespace, manifest)
    assert code == 0, message
    # Budget and parallelism may change ...
    cluster.kubectl(
        "patch", "llmsearch", "fixed", "-n", namespace, "--type=merge", "-p", '{"spec":{"maxTrials":20}}'
    )
    # ... the space the recorded trials were drawn from may not.
    patch = [{"op": "replace", "path": "/spec/parameters/0/max", "value": 0.5}]
    proc = cluster.kubectl(
        "patch", "llmsearch", "fixed", "-n", namespace, "--type=json", "-p", json.dumps(patch), check=False
    )
    assert proc.returncode != 0 and "cannot change" in proc.stderr, proc.stderr


def test_a_trial_that_would_be_invalid_at_a_range_end_is_rejected_by_the_models() -> None:
    # The apiserver cannot see this (it would have to apply the value to the template); the operator
    # marks such a search Failed with reason InvalidSpec (tests/cluster/search/test_search_cluster.py).
    manifest = base()
    manifest["spec"]["parameters"] = [
        {"name": "seq", "path": "training.sequenceLength", "type": "Int", "min": 64, "max": 512}
    ]
    with pytest.raises(ValidationError, match=r"training\.sequenceLength=512 gives an invalid trial"):
        LLMHyperparameterSearchSpec.model_validate(manifest["spec"])


@pytest.mark.cluster
def test_the_example_is_accepted_as_written(cluster: Cluster, namespace: str) -> None:
    manifest = yaml.safe_load((REPO / "examples" / "search.yaml").read_text())
    code, message = _create(cluster, namespace, manifest)
    assert code == 0, message
    stored = cluster.kubectl_json("get", "llmsearch", manifest["metadata"]["name"], "-n", namespace)
    assert stored["spec"]["parameters"] == manifest["spec"]["parameters"]
    assert stored["spec"]["trialTemplate"]["training"]["maxSteps"] == 120
