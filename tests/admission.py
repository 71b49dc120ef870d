"""What the API models must say about a bad spec: shared by the job and search admission tests."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError


def error_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic loc as the apiserver writes a field path: spec.a.b[0].c."""
    return "spec" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def assert_models_reject(
    model: type[BaseModel], spec: Any, case: str, where: str, fragment: str, field: str
) -> None:
    """``model`` rejects ``spec`` with exactly one error, at ``where`` (the apiserver's ``field`` or a
    parent of it), whose message contains ``fragment``."""
    with pytest.raises(ValidationError) as raised:
        model.model_validate(spec)
    errors = raised.value.errors()
    assert len(errors) == 1, f"{case}: one mistake, one error: {errors}"
    loc, message = error_path(errors[0]["loc"]), errors[0]["msg"]
    assert loc == where, f"{case}: the models blame {loc}, expected {where}: {message}"
    assert field == loc or field.startswith((f"{loc}.", f"{loc}[")), f"{case}: {loc} is not above {field}"
    assert fragment in message, f"{case}: {message!r} does not say {fragment!r}"
