"""Which fields of an LLMTrainingJob spec a hyperparameter search may set, read from the models.

A search parameter names its target by a dotted camelCase path (``training.optimizer.learningRate``).
The list of valid paths, their kinds and their bounds are derived here from ``LLMTrainingJobSpec``
itself, so a field added to the training API becomes tunable (and checked at admission) without any
change to the search API.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel

from llmop_contract.api.v1alpha1.job import LLMTrainingJobSpec

Kind = Literal["float", "int", "bool", "enum", "string"]

# Trials run without compression and serving (see docs/search.md), so tuning them would mean nothing;
# suspending a trial would stall the search.
EXCLUDED = ("compression", "serving", "runPolicy.suspend")
_NO_BOUND = 1e308


@dataclass(frozen=True)
class Leaf:
    """One scalar field of the spec."""

    path: str
    kind: Kind
    lower: float | None = None
    lower_exclusive: bool = False
    upper: float | None = None
    upper_exclusive: bool = False

    @property
    def numeric(self) -> bool:
        return self.kind in ("float", "int")


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else tuple(members)
    return annotation


def _kind(annotation: Any) -> Kind | None:
    if isinstance(annotation, tuple):  # a union of scalars, e.g. a resource quantity
        return "string" if all(a in (str, int, float) for a in annotation) else None
    if not isinstance(annotation, type):
        return None
    if issubclass(annotation, Enum):
        return "enum"
    if annotation is bool:  # before int: bool is an int subclass
        return "bool"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    if annotation is str:
        return "string"
    return None


def _leaf(path: str, kind: Kind, metadata: list[Any]) -> Leaf:
    bounds: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            bounds.update(lower=float(m.ge))  # type: ignore[arg-type]
        elif isinstance(m, annotated_types.Gt):
            bounds.update(lower=float(m.gt), lower_exclusive=True)  # type: ignore[arg-type]
        elif isinstance(m, annotated_types.Le):
            bounds.update(upper=float(m.le))  # type: ignore[arg-type]
        elif isinstance(m, annotated_types.Lt):
            bounds.update(upper=float(m.lt), upper_exclusive=True)  # type: ignore[arg-type]
    return Leaf(path, kind, **bounds)


def _walk(model: type[BaseModel], prefix: str) -> list[Leaf]:
    found: list[Leaf] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        if path in EXCLUDED:
            continue
        annotation = _unwrap_optional(info.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.extend(_walk(annotation, f"{path}."))
        elif kind := _kind(annotation):
            found.append(_leaf(path, kind, info.metadata))
    return found


LEAVES: dict[str, Leaf] = {leaf.path: leaf for leaf in _walk(LLMTrainingJobSpec, "")}
PATHS = tuple(LEAVES)
FLOAT_PATHS = tuple(p for p, leaf in LEAVES.items() if leaf.kind == "float")
NUMERIC_PATHS = tuple(p for p, leaf in LEAVES.items() if leaf.numeric)
BOOL_PATHS = tuple(p for p, leaf in LEAVES.items() if leaf.kind == "bool")


def convert(path: str, text: str) -> Any:
    """A categorical choice (a string, as written in the manifest) as the type of the field at path."""
    kind = LEAVES[path].kind if path in LEAVES else "string"
    if kind == "bool":
        return text == "true"
    if kind in ("int", "float"):
        number = float(text)
        return int(number) if kind == "int" and number.is_integer() else number
    return text


def cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _cel_double(value: float) -> str:
    text = repr(float(value))
    return text if any(c in text for c in ".e") else f"{text}.0"


def cel_bounds(side: Literal["lower", "upper"]) -> str:
    """A CEL map literal: path -> [bound, 1.0 if exclusive else 0.0] for every numeric leaf."""
    entries = []
    for path in NUMERIC_PATHS:
        leaf = LEAVES[path]
        bound = leaf.lower if side == "lower" else leaf.upper
        exclusive = leaf.lower_exclusive if side == "lower" else leaf.upper_exclusive
        if bound is None:
            bound = -_NO_BOUND if side == "lower" else _NO_BOUND
        entries.append(f"'{path}': [{_cel_double(bound)}, {'1.0' if exclusive else '0.0'}]")
    return "{" + ", ".join(entries) + "}"


def within_lower(path: str, value: float) -> bool:
    leaf = LEAVES.get(path)
    if leaf is None or leaf.lower is None:
        return True
    return value > leaf.lower if leaf.lower_exclusive else value >= leaf.lower


def within_upper(path: str, value: float) -> bool:
    leaf = LEAVES.get(path)
    if leaf is None or leaf.upper is None:
        return True
    return value < leaf.upper if leaf.upper_exclusive else value <= leaf.upper


def apply(spec: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted camelCase path in a manifest-shaped spec, creating sections that are absent."""
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
