"""Generates the CustomResourceDefinitions in ``crds/`` from the pydantic models.

Pydantic emits JSON Schema (2020-12); a CRD needs a *structural* OpenAPI v3 schema: every node typed,
no ``$ref``, no ``anyOf`` except for int-or-string, ``exclusiveMinimum`` as a boolean, no
``additionalProperties: false`` (the apiserver prunes or, under strict field validation, rejects
unknown fields itself). This module does that translation and adds what JSON Schema cannot say:
nested-object defaults, CEL rules, list types and printer columns.

Run ``python -m llmop_contract.api.crdgen crds/`` (``make crds``) after changing a model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from llmop_contract.api.v1alpha1 import job as j
from llmop_contract.api.v1alpha1 import search as s
from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec
from llmop_contract.api.v1alpha1.search_status import LLMHyperparameterSearchStatus
from llmop_contract.api.v1alpha1.status import LLMTrainingJobStatus

Schema = dict[str, Any]


class _WithFactoryDefaults(GenerateJsonSchema):
    """Also emit defaults that come from ``default_factory``.

    A nested section (``training.optimizer``) defaults to its model's fully-populated default, not to
    ``{}``: the apiserver checks CEL rules against the default itself, before inner defaults apply.
    Empty collections stay without a default so the stored object shows only what was set.
    """

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return value.model_dump(by_alias=True, mode="json", exclude_none=True)
        return value if value else NoDefault


_DROP = {"title", "additionalProperties", "$defs"}


def structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Translate one pydantic JSON-Schema node into a structural OpenAPI v3 node."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}  # the referencing site's description/default win
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if node.get("default", "") is None:
            del node["default"]
        if len(options) == 1:
            return structural({**options[0], **node}, defs)
        if node.pop("x-llmop-quantity", False) or {o.get("type") for o in options} == {"integer", "string"}:
            int_or_string = {k: v for k, v in node.items() if k not in _DROP}
            int_or_string["x-kubernetes-int-or-string"] = True
            return int_or_string
        raise ValueError(f"cannot express anyOf {options} structurally")
    node.pop("x-llmop-quantity", None)

    out: Schema = {k: v for k, v in node.items() if k not in _DROP}
    if isinstance(out.get("exclusiveMinimum"), (int, float)) and not isinstance(
        out["exclusiveMinimum"], bool
    ):
        out["minimum"], out["exclusiveMinimum"] = out["exclusiveMinimum"], True
    if isinstance(out.get("exclusiveMaximum"), (int, float)) and not isinstance(
        out["exclusiveMaximum"], bool
    ):
        out["maximum"], out["exclusiveMaximum"] = out["exclusiveMaximum"], True
    if "type" not in out and "enum" in out:
        out["type"] = "string"

    if out.get("type") == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props is not None:
            out["properties"] = {}
            for name, prop in props.items():
                out["properties"][name] = structural(prop, defs)
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural(extra, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif out.get("type") == "array":
        out["items"] = structural(node["items"], defs)
    return _ordered(out)


_FIRST = ("description", "type")


def _ordered(node: Schema) -> Schema:
    """Description and type first, the rest alphabetical: a stable, readable diff."""
    keys = [k for k in _FIRST if k in node] + sorted(k for k in node if k not in _FIRST)
    return {k: node[k] for k in keys}


def model_schema(model: type[Any]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_WithFactoryDefaults)
    return structural(raw, raw.get("$defs", {}))


PRINTER_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".status.state", "description": "Lifecycle state"},
    {
        "name": "Nodes",
        "type": "integer",
        "jsonPath": ".status.currentNodes",
        "description": "Worker nodes of the current attempt (an elastic gang's current size)",
    },
    {
        "name": "GPUs/Node",
        "type": "integer",
        "jsonPath": ".spec.workers.gpusPerNode",
        "description": "GPUs per worker",
    },
    {
        "name": "Step",
        "type": "integer",
        "jsonPath": ".status.progress.step",
        "description": "Training steps done",
    },
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress.summary",
        "description": "Training progress",
    },
    {
        "name": "Restarts",
        "type": "integer",
        "jsonPath": ".status.restartCount",
        "description": "Gang restarts counted against backoffLimit",
    },
    {
        "name": "Engine",
        "type": "string",
        "jsonPath": ".status.serving.engine",
        "description": "Serving engine (VLLM or Builtin)",
        "priority": 1,
    },
    {
        "name": "Endpoint",
        "type": "string",
        "jsonPath": ".status.serving.url",
        "description": "Completions API of the served model",
        "priority": 1,  # a URL is long: `kubectl get -o wide` shows it
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def llmtrainingjob_crd() -> Schema:
    spec = model_schema(LLMTrainingJobSpec)
    spec["x-kubernetes-validations"] = [
        *spec.get("x-kubernetes-validations", []),
        *(rule.schema() for rule in j.IMMUTABILITY_RULES),
    ]
    status = model_schema(LLMTrainingJobStatus)
    status["properties"]["conditions"].update(
        {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    status["properties"]["stages"].update(
        {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}
    )
    root = {
        "type": "object",
        "description": "LLMTrainingJob carries one LLM training run through data preparation, "
        "distributed DeepSpeed training, compression and serving.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version: llmop.io/v1alpha1."},
            "kind": {"type": "string", "description": "LLMTrainingJob."},
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": j.MAX_NAME_LENGTH,
                        "description": f"A DNS-1035 label of at most {j.MAX_NAME_LENGTH} characters: pod, service and job names are derived from it.",
                    }
                },
            },
            "spec": spec,
            "status": status,
        },
        # At the root: metadata.name is the one metadata field CEL may read there.
        "x-kubernetes-validations": [j.NAME_RULE.schema(), j.COMPRESSION_FROZEN_RULE.schema()],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{j.PLURAL}.{j.GROUP}"},
        "spec": {
            "group": j.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": j.KIND,
                "listKind": f"{j.KIND}List",
                "plural": j.PLURAL,
                "singular": j.SINGULAR,
                "shortNames": list(j.SHORT_NAMES),
                "categories": list(j.CATEGORIES),
            },
            "versions": [
                {
                    "name": j.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


SEARCH_PRINTER_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".status.state", "description": "Search state"},
    {"name": "Algorithm", "type": "string", "jsonPath": ".spec.algorithm", "description": "Sampler"},
    {
        "name": "Finished",
        "type": "integer",
        "jsonPath": ".status.counts.finished",
        "description": "Trials finished",
    },
    {"name": "Max", "type": "integer", "jsonPath": ".spec.maxTrials", "description": "maxTrials"},
    {
        "name": "Running",
        "type": "integer",
        "jsonPath": ".status.counts.running",
        "description": "Trials running",
    },
    {
        "name": "Failed",
        "type": "integer",
        "jsonPath": ".status.counts.failed",
        "description": "Trials failed",
    },
    {
        "name": "Best",
        "type": "number",
        "jsonPath": ".status.bestTrial.value",
        "description": "Best objective",
    },
    {
        "name": "Best-Trial",
        "type": "string",
        "jsonPath": ".status.bestTrial.name",
        "description": "Trial job with the best objective",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def llmhyperparametersearch_crd() -> Schema:
    spec = model_schema(s.LLMHyperparameterSearchSpec)
    status = model_schema(LLMHyperparameterSearchStatus)
    status["properties"]["conditions"].update(
        {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    status["properties"]["trials"].update(
        {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["index"]}
    )
    root = {
        "type": "object",
        "description": "LLMHyperparameterSearch runs trials of an LLMTrainingJob template over a parameter "
        "space (grid, random, TPE or Gaussian-process search) and reports the best configuration.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version: llmop.io/v1alpha1."},
            "kind": {"type": "string", "description": "LLMHyperparameterSearch."},
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": s.MAX_SEARCH_NAME_LENGTH,
                        "description": f"A DNS-1035 label of at most {s.MAX_SEARCH_NAME_LENGTH} characters: trial jobs are "
                        "named <search>-NNN and <search>-best.",
                    }
                },
            },
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [s.SEARCH_NAME_RULE.schema()],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{s.PLURAL}.{j.GROUP}"},
        "spec": {
            "group": j.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": s.KIND,
                "listKind": f"{s.KIND}List",
                "plural": s.PLURAL,
                "singular": s.SINGULAR,
                "shortNames": list(s.SHORT_NAMES),
                "categories": list(s.CATEGORIES),
            },
            "versions": [
                {
                    "name": j.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": SEARCH_PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_all() -> dict[str, str]:
    """File name -> YAML text of every CRD the project ships."""
    header = "# Generated by `make crds` from operator/contract/llmop_contract/api; do not edit by hand.\n"
    return {
        f"{j.GROUP}_{crd['spec']['names']['plural']}.yaml": header
        + yaml.safe_dump(crd, sort_keys=False, width=100)
        for crd in (llmtrainingjob_crd(), llmhyperparametersearch_crd())
    }


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1] if len(argv) > 1 else "crds")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (out_dir / name).write_text(text)
        print(out_dir / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
