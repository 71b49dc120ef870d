"""Each image gets its own code and the contract, nothing of the others.

The trainer image installs llmop-contract and llmtrain (trainer_image/Dockerfile), the operator image
llmop-contract and llmop (operator/Dockerfile); neither installs llmop-dev. These tests check what
that means without Docker: what a fresh interpreter loads when it imports the trainer, and what
each distribution's wheel holds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Walks a package, imports every module, prints the modules then loaded and how many were walked.
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
walked = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in walked:
    importlib.import_module(name)
print(json.dumps({"walked": walked, "loaded": sorted(sys.modules)}))
"""

# Top-level modules that belong to the operator or the development tools, never to a trainer pod.
OPERATOR_SIDE = ("kopf", "kubernetes", "llmop", "llmop_dev", "optuna")


def _import_all(package: str) -> tuple[list[str], list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, package], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["walked"], out["loaded"]


def _top_level(modules: list[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


@pytest.mark.slow
def test_importing_every_trainer_module_loads_nothing_of_the_operator() -> None:
    walked, loaded = _import_all("llmtrain")
    # The walk really covered the trainer: its stages' packages and their modules.
    for module in (
        "llmtrain.train.loop",
        "llmtrain.prepare.pipeline",
        "llmtrain.compress.run",
        "llmtrain.serve.app",
    ):
        assert module in walked
    assert "torch" in _top_level(loaded)  # a real import, not a walk of empty stubs
    leaked = sorted(m for m in loaded if m.split(".")[0] in OPERATOR_SIDE)
    assert leaked == [], f"the trainer loaded operator-side modules: {leaked[:20]}"
    assert "llmop_contract.protocol" in loaded


def test_the_contract_needs_only_pydantic_and_yaml() -> None:
    walked, loaded = _import_all("llmop_contract")
    assert "llmop_contract.api.crdgen" in walked and "llmop_contract.deepspeed" in walked
    heavy = _top_level(loaded) & {"torch", "deepspeed", "transformers", "numpy", *OPERATOR_SIDE}
    assert heavy == set()


def _wheel_files(source: Path, tmp_path: Path) -> list[str]:
    """Build the distribution whose pyproject.toml is in ``source`` (from a copy) and list its wheel."""
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))",
            str(out),
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with zipfile.ZipFile(out / proc.stdout.strip().splitlines()[-1]) as wheel:
        return wheel.namelist()


def _copy(tmp_path: Path, *paths: str) -> Path:
    root = tmp_path / "src"
    for path in paths:
        src, dst = REPO / path, root / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        else:
            shutil.copy2(src, dst)
    return root


def _packages(files: list[str]) -> set[str]:
    return {f.split("/")[0] for f in files if not f.split("/")[0].endswith(".dist-info")}


def test_each_distribution_ships_only_its_own_package(tmp_path: Path) -> None:
    contract = _copy(tmp_path / "c", "operator/contract") / "operator/contract"
    trainer = (
        _copy(tmp_path / "t", "trainer_image/pyproject.toml", "trainer_image/llmtrain") / "trainer_image"
    )
    operator = _copy(tmp_path / "o", "pyproject.toml", "README.md", "operator/llmop")
    dev = _copy(tmp_path / "d", "operator/dev") / "operator/dev"

    assert _packages(_wheel_files(contract, tmp_path / "c")) == {"llmop_contract"}
    trainer_files = _wheel_files(trainer, tmp_path / "t")
    assert _packages(trainer_files) == {"llmtrain"}
    # The bundled corpus and DeepSpeed configs are package data the demo's pods read.
    assert any(f.startswith("llmtrain/corpus/") and not f.endswith(".py") for f in trainer_files)
    operator_files = _wheel_files(operator, tmp_path / "o")
    assert _packages(operator_files) == {"llmop"}
    assert not [f for f in operator_files if f.startswith("llmop/dev/")]
    dev_files = _wheel_files(dev, tmp_path / "d")
    assert _packages(dev_files) == {"llmop_dev"}
    # The runtime's data files travel with it: kwok stages and the bind shim's C source.
    assert "llmop_dev/kwok/stages.yaml" in dev_files and "llmop_dev/runtime/bindpod.c" in dev_files


def _copied(dockerfile: str) -> set[str]:
    """The sources of a Dockerfile's COPY instructions."""
    lines = (REPO / dockerfile).read_text().splitlines()
    return {src for line in lines if line.startswith("COPY ") for src in line.split()[1:-1]}


def test_the_images_copy_their_own_distributions_only() -> None:
    assert _copied("trainer_image/Dockerfile") == {
        "operator/contract",
        "operator/contract/pyproject.toml",
        "trainer_image/pyproject.toml",
        "trainer_image/llmtrain",
    }
    assert _copied("operator/Dockerfile") == {
        "operator/contract",
        "pyproject.toml",
        "README.md",
        "operator/llmop",
    }
