"""Shared base for every API model: camelCase on the wire, strict about unknown fields.

The same models validate a manifest in the operator and the rendered configuration in the trainer,
and they generate the CRD schema (see ``crdgen``), so one class is the single source of truth for a
field's name, type, default, bounds and description.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, written once and enforced twice with the same message.

    ``cel`` goes into the CRD's ``x-kubernetes-validations`` so the apiserver rejects a bad manifest
    at admission; ``check`` runs in pydantic so the trainer rejects the same configuration when it is
    given a file directly. A test applies every rule's counter-example to both.
    """

    cel: str
    check: Callable[[Any], bool]
    message: str
    field_path: str | None = None

    def schema(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


class ApiModel(BaseModel):
    """Base for spec models. Subclasses list their cross-field rules in ``rules``."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
        strict=True,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        if cls.rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [rule.schema() for rule in cls.rules]
        return schema

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        for rule in self.rules:
            if not rule.check(self):
                raise ValueError(rule.message)
        return self

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        """Validate a manifest-shaped mapping the way the apiserver does.

        Manifests arrive as JSON or YAML, so mappings are validated in pydantic's strict JSON mode:
        enum values are accepted as strings, but 1 is not a boolean and "8" is not an integer, just
        as the CRD schema rejects them. (Strict python mode would demand Enum instances.)
        """
        if isinstance(obj, Mapping):
            kwargs.pop("from_attributes", None)
            return cls.model_validate_json(json.dumps(obj), **kwargs)
        return super().model_validate(obj, **kwargs)

    def to_wire(self) -> dict[str, Any]:
        """The manifest form: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# A Kubernetes resource quantity ("8", "500m", "64Gi"); rendered as int-or-string in the CRD.
Quantity = Annotated[
    str | int,
    Field(json_schema_extra={"x-llmop-quantity": True}),
]
