"""Load and validate a TrainerConfig file, turning pydantic errors into field-named messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import ValidationError

from llmop_contract.api.base import ApiModel
from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.protocol import ExitCode


class ConfigError(ValueError):
    """The configuration is unreadable, invalid or cannot be carried out: exit 2, nothing was started.

    The one error type for a configuration the user has to fix, whichever stage finds it.
    ``ConfigError(field, message)`` names the offending field (``spec.data.sources[0].uri: ...``);
    ``ConfigError(message)`` is a message that already does (every bad field of a file, say).
    """

    exit_code: Final = ExitCode.BAD_CONFIG

    def __init__(self, field: str, message: str | None = None) -> None:
        super().__init__(field if message is None else f"{field}: {message}")
        self.field = None if message is None else field


class DataError(ConfigError):
    """The data or the model directory a stage reads is missing, empty or too small: exit 2 as well.

    Not a crash: a retry reads the same files and fails the same way, so the operator must fail the
    job instead of restarting it (``ExitCode.BAD_CONFIG`` is the one code it never retries).
    """


def _all_rules() -> dict[str, str]:
    """Cross-field rule message -> the field it points at (relative, e.g. ".training.sequenceLength")."""
    out: dict[str, str] = {}
    todo: list[type[ApiModel]] = [ApiModel]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        for rule in cls.rules:
            if rule.field_path:
                out[rule.message] = rule.field_path
    return out


def _describe(err: dict[str, Any], rules: dict[str, str]) -> str:
    path = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    # A rule fails on the model that holds it; its fieldPath says which field inside it is wrong.
    if msg in rules:
        path = (path + rules[msg]) if path else rules[msg].lstrip(".")
    return f"{path or '<root>'}: {msg}"


def load_config(path: str | Path) -> TrainerConfig:
    """Read ``path`` (YAML or JSON) into a TrainerConfig, or raise ConfigError naming the fields."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    try:
        return TrainerConfig.model_validate(raw)
    except ValidationError as exc:
        rules = _all_rules()
        lines = [_describe(dict(e), rules) for e in exc.errors()]
        raise ConfigError(f"invalid config {path}:\n  " + "\n  ".join(lines)) from exc
