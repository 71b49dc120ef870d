"""The checked-in CRDs are exactly what the models generate (run `make crds` after a model change)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmop_contract.api import crdgen

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_crds_match_models() -> None:
    rendered = crdgen.render_all()
    on_disk = {p.name: p.read_text() for p in (REPO / "crds").glob("*.yaml")}
    assert set(on_disk) == set(rendered), "crds/ holds files the models do not generate (or misses some)"
    for name, text in rendered.items():
        assert on_disk[name] == text, f"crds/{name} drifted from the models: run `make crds`"


@pytest.mark.parametrize("build", [crdgen.llmtrainingjob_crd, crdgen.llmhyperparametersearch_crd])
def test_every_spec_field_is_described(build: Callable[[], dict[str, Any]]) -> None:
    crd = build()
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing: list[str] = []

    def walk(node: dict, path: str) -> None:  # type: ignore[type-arg]
        if not node.get("description"):
            missing.append(path)
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        if "items" in node and "properties" in node["items"]:
            walk(node["items"], f"{path}[]")

    walk(schema, "spec")
    assert missing == [], f"fields without a description (kubectl explain shows nothing): {missing}"
