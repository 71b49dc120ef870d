"""The operator's PodGroups against the released Volcano and scheduler-plugins CRD schemas, offline.

Neither scheduler is served as a Go module here (docs/scheduling.md), so their PodGroups are proven
at the schema level: here in seconds, and on the real kube-apiserver in
tests/cluster/test_gang_schedulers.py. `admit` does what the apiserver does to a custom resource
under a structural schema, in its order: prune the fields the schema does not declare, apply
defaults, validate. A PodGroup passes only if nothing is pruned, nothing is invalid, and every
field the builder set is stored as it set it.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import pytest

from llmop.builders import JobRef, scheduling
from llmop_contract.api.v1alpha1 import LLMTrainingJobSpec
from tests.cluster import crds

Schema = dict[str, Any]
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# Every keyword the vendored schemas use. A newer CRD with another keyword fails here, loudly, rather
# than passing unchecked.
HANDLED = {
    "description", "type", "properties", "additionalProperties", "required", "items", "default",
    "enum", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "maxLength",
    "minLength", "maxItems", "minItems", "pattern", "anyOf", "nullable",
    "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
}  # fmt: skip
TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def _type_ok(value: Any, type_: str) -> bool:
    if isinstance(value, bool) and type_ != "boolean":
        return False
    return isinstance(value, TYPES[type_])


def admit(value: Any, schema: Schema, path: str = "", problems: list[str] | None = None) -> Any:
    """What the apiserver stores for `value` under `schema`; `problems` gets each pruned field
    ("pruned: path") and each validation error ("path: why")."""
    problems = [] if problems is None else problems
    unknown = set(schema) - HANDLED
    assert not unknown, f"{path or '<root>'}: schema keywords this check does not implement: {unknown}"
    if value is None:
        if not schema.get("nullable"):
            problems.append(f"{path}: null, and the field is not nullable (the apiserver drops it)")
        return value
    if schema.get("x-kubernetes-int-or-string"):
        if not _type_ok(value, "integer") and not _type_ok(value, "string"):
            problems.append(f"{path}: {value!r} is neither an integer nor a string")
    elif (t := schema.get("type")) and not _type_ok(value, t):
        problems.append(f"{path}: {value!r} is not of type {t}")
        return value
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "anyOf" in schema and not any(
        not _problems(value, {k: v for k, v in sub.items()}) for sub in schema["anyOf"]
    ):
        problems.append(f"{path}: {value!r} matches none of anyOf")
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{path}: longer than {schema['maxLength']}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            problems.append(f"{path}: shorter than {schema['minLength']}")
        # The patterns in these CRDs are RE2 and Python re alike (anchored, no look-around).
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = {"int32": INT32, "int64": INT64}.get(schema.get("format", ""), (None, None))
        if low is not None and high is not None and not low <= value <= high:
            problems.append(f"{path}: {value} does not fit {schema['format']}")
        if "minimum" in schema and (
            value <= schema["minimum"] if schema.get("exclusiveMinimum") else value < schema["minimum"]
        ):
            problems.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and (
            value >= schema["maximum"] if schema.get("exclusiveMaximum") else value > schema["maximum"]
        ):
            problems.append(f"{path}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            problems.append(f"{path}: more than {schema['maxItems']} items")
        if "minItems" in schema and len(value) < schema["minItems"]:
            problems.append(f"{path}: fewer than {schema['minItems']} items")
        if isinstance(items := schema.get("items"), dict):
            return [admit(v, items, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return value
    if isinstance(value, dict):
        return _admit_object(value, schema, path, problems)
    return value


def _admit_object(value: dict[str, Any], schema: Schema, path: str, problems: list[str]) -> dict[str, Any]:
    props: dict[str, Schema] = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    keep_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or extra is True
    stored: dict[str, Any] = {}
    for key, sub in value.items():
        where = f"{path}.{key}"
        if path == "" and key in ("apiVersion", "kind", "metadata"):
            stored[key] = sub  # the apiserver's own: ObjectMeta is validated by the apiserver, not the CRD
        elif key in props:
            stored[key] = admit(sub, props[key], where, problems)
        elif isinstance(extra, dict):
            stored[key] = admit(sub, extra, where, problems)
        elif keep_unknown:
            stored[key] = sub
        else:
            problems.append(f"pruned: {where}")
    for key, sub in props.items():  # defaulting: after pruning, before validation of the result
        if key not in stored and "default" in sub:
            stored[key] = admit(copy.deepcopy(sub["default"]), sub, f"{path}.{key}", problems)
    for key in schema.get("required", []):
        if key not in stored:
            problems.append(f"{path}.{key}: required")
    return stored


def _problems(value: Any, schema: Schema) -> list[str]:
    found: list[str] = []
    admit(value, schema, "", found)
    return found


def ref(**over: Any) -> JobRef:
    raw: dict[str, Any] = {
        "data": {"sources": [{"uri": "builtin://english"}]},
        "training": {"maxSteps": 10, "globalBatchSize": 16, "microBatchSize": 1},
        "workers": {"numNodes": 2, "procsPerNode": 8, "gpusPerNode": 8},
    }
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value}
    w = raw["workers"]
    # A batch every data-parallel size the gang may take divides.
    sizes = range(w.get("minNodes", w["numNodes"]), w.get("maxNodes", w["numNodes"]) + 1)
    raw["training"]["globalBatchSize"] = w["procsPerNode"] * math.lcm(*sizes)
    return JobRef("llama", "team", "uid-1", LLMTrainingJobSpec.model_validate(raw))


VOLCANO = {"gangScheduler": "Volcano"}
COSCHEDULING = {"gangScheduler": "Coscheduling"}
CPU = {"procsPerNode": 4, "gpusPerNode": 0}
# Every shape of PodGroup the builder makes: each scheduler, with and without the optional fields,
# at the edges of the API's ranges.
CASES: dict[str, dict[str, Any]] = {
    "volcano": {"scheduling": VOLCANO},
    "volcano-queue": {"scheduling": {**VOLCANO, "queueName": "research.team-a"}},
    "volcano-priority": {"scheduling": VOLCANO, "workers": {"priorityClassName": "training-high"}},
    "volcano-cpu-only": {"scheduling": VOLCANO, "workers": CPU},
    "volcano-one-node": {"scheduling": VOLCANO, "workers": {"numNodes": 1}},
    "volcano-1024-nodes": {"scheduling": VOLCANO, "workers": {"numNodes": 1024}},
    "volcano-elastic": {"scheduling": VOLCANO, "workers": {"numNodes": 4, "minNodes": 2, "maxNodes": 8}},
    "volcano-long-names": {
        "scheduling": {**VOLCANO, "queueName": "q" * 63},
        "workers": {"priorityClassName": "p" * 253},
    },
    "coscheduling": {"scheduling": COSCHEDULING},
    "coscheduling-cpu-only": {"scheduling": COSCHEDULING, "workers": CPU},
    "coscheduling-one-node": {"scheduling": COSCHEDULING, "workers": {"numNodes": 1}},
    "coscheduling-1024-nodes": {"scheduling": COSCHEDULING, "workers": {"numNodes": 1024}},
    "coscheduling-short-timeout": {"scheduling": {**COSCHEDULING, "scheduleTimeoutSeconds": 1}},
    "coscheduling-priority": {"scheduling": COSCHEDULING, "workers": {"priorityClassName": "training-high"}},
    # The API's bound is the PodGroup field's: an int32.
    "coscheduling-longest-timeout": {"scheduling": {**COSCHEDULING, "scheduleTimeoutSeconds": 2**31 - 1}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pod_group_is_admitted_unchanged_under_the_released_schema(case: str) -> None:
    group = scheduling.build_pod_group(ref(**CASES[case]))
    assert group is not None
    problems: list[str] = []
    stored = admit(group, crds.schema(group["apiVersion"]), "", problems)
    assert problems == [], f"{case}: the apiserver would prune or reject: {problems}"
    assert crds.lost_fields(group, stored) == []


def test_every_gang_scheduler_is_covered() -> None:
    """A new GangScheduler value needs a CRD here and cases above."""
    from llmop_contract.api.v1alpha1.workload import GangScheduler

    kinds = {
        g["apiVersion"]
        for over in CASES.values()
        if (g := scheduling.build_pod_group(ref(**over))) is not None
    }
    assert kinds == set(crds.BY_API_VERSION)
    for value in GangScheduler:
        group = scheduling.build_pod_group(ref(scheduling={"gangScheduler": value.value}))
        assert (group is None) == (value == GangScheduler.NONE)


def test_what_the_builder_sets_and_what_the_schema_defaults() -> None:
    volcano = scheduling.build_pod_group(
        ref(scheduling=VOLCANO, workers={"numNodes": 4, "priorityClassName": "training-high"})
    )
    assert volcano is not None
    stored = admit(volcano, crds.schema(volcano["apiVersion"]))
    assert stored["spec"] == {
        "minMember": 4,
        "minResources": {"nvidia.com/gpu": "32"},
        "priorityClassName": "training-high",
        "queue": "default",  # Volcano's schema default: the job goes to Volcano's default queue
    }
    cosched = scheduling.build_pod_group(ref(scheduling={**COSCHEDULING, "scheduleTimeoutSeconds": 90}))
    assert cosched is not None
    assert admit(cosched, crds.schema(cosched["apiVersion"]))["spec"] == {
        "minMember": 2,
        "minResources": {"nvidia.com/gpu": "16"},
        "scheduleTimeoutSeconds": 90,
    }
    # Beyond an int32 the job is refused at admission, not turned into a PodGroup the apiserver refuses.
    with pytest.raises(ValueError, match=r"scheduleTimeoutSeconds|schedule_timeout_seconds"):
        ref(scheduling={**COSCHEDULING, "scheduleTimeoutSeconds": 2**31})


# Manifests the released schemas refuse or cut down: the check above is only worth something if it
# catches these (tests/cluster/test_gang_schedulers.py sends the same ones to the apiserver).
BROKEN: list[tuple[str, str, dict[str, Any], str]] = [
    ("scheduling.x-k8s.io/v1alpha1", "minMember 0", {"minMember": 0}, "below the minimum 1"),
    ("scheduling.x-k8s.io/v1alpha1", "minMember as a string", {"minMember": "4"}, "not of type integer"),
    ("scheduling.x-k8s.io/v1alpha1", "no queues", {"minMember": 1, "queue": "a"}, "pruned: .spec.queue"),
    (
        "scheduling.x-k8s.io/v1alpha1",
        "no priority class",
        {"minMember": 1, "priorityClassName": "high"},
        "pruned: .spec.priorityClassName",
    ),
    (
        "scheduling.x-k8s.io/v1alpha1",
        "int32 timeout",
        {"minMember": 1, "scheduleTimeoutSeconds": 2**31},
        "does not fit int32",
    ),
    (
        "scheduling.x-k8s.io/v1alpha1",
        "not a quantity",
        {"minMember": 1, "minResources": {"nvidia.com/gpu": "eight"}},
        "does not match",
    ),
    ("scheduling.volcano.sh/v1beta1", "misspelt", {"minMembers": 4}, "pruned: .spec.minMembers"),
    ("scheduling.volcano.sh/v1beta1", "queue name", {"queue": "Team_A"}, "does not match"),
    ("scheduling.volcano.sh/v1beta1", "negative", {"minMember": -1}, "below the minimum 0"),
    ("scheduling.volcano.sh/v1beta1", "no timeout", {"scheduleTimeoutSeconds": 60}, "pruned"),
]


@pytest.mark.parametrize(("api_version", "what", "spec", "expected"), BROKEN, ids=[b[1] for b in BROKEN])
def test_the_check_catches_what_the_schema_refuses(
    api_version: str, what: str, spec: dict[str, Any], expected: str
) -> None:
    group = {"apiVersion": api_version, "kind": "PodGroup", "metadata": {"name": "g"}, "spec": spec}
    problems = _problems(group, crds.schema(api_version))
    assert any(expected in p for p in problems), f"{what}: {problems}"
