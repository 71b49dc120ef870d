"""Bad data at every entry point: exit 2 (the operator fails the job, never retries), one line naming
the cause, no traceback, and the same line in the termination message for the job's Failed condition.

Each case runs the entry point as the pod does (a subprocess of ``python -m llmtrain.cli ...``).
Train and compress refuse before torch is imported (``torchless_env``), so no model is ever built.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmop_contract.protocol import MANIFEST_FILE, TerminationMessage
from llmtrain import corpus
from llmtrain.testing import debug_config, license_documents, write_shards
from tests.trainer.conftest import torchless_env, train_env

LLAMA_CONFIG = {  # what ModelShape reads from an export's config.json: enough to get past it
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 172,
    "vocab_size": 512,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}
STUDENT = {"hiddenSize": 32, "numLayers": 1, "numHeads": 2, "intermediateSize": 64}


def refused(
    args: list[str], tmp_path: Path, *, torch: bool = False, **extra_env: str
) -> tuple[str, TerminationMessage]:
    """Run ``llmtrain ARGS``; assert exit 2, no traceback and one ``llmtrain <cmd>: `` line (the last on
    stderr; prepare logs its progress there before it). Returns that line and the termination message."""
    termination = tmp_path / "termination-log"
    env = train_env() if torch else torchless_env(tmp_path, train_env())
    env.update(LLMOP_TERMINATION_LOG=str(termination), **extra_env)
    proc = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    prefix = f"llmtrain {args[0]}: "
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith(prefix)] == lines[-1:], lines
    if args[0] != "prepare":
        assert len(lines) == 1, lines
    message = TerminationMessage.decode(termination.read_text())
    assert message.extra["exitCode"] == 2 and lines[-1] == prefix + message.extra["message"]
    print(lines[-1])
    return lines[-1], message


# --- prepare ---------------------------------------------------------------------------------------


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _english(n: int) -> list[str]:
    return [str(r["text"]) for r in corpus.load("english")[:n]]


PREPARE_CASES: dict[str, tuple[Callable[[Path], list[str]], dict[str, Any], str]] = {
    "empty corpus": (lambda tmp: [], {}, "spec.data.sources: the sources hold no documents (0 read)"),
    "duplicates only": (
        lambda tmp: _english(1) * 40,
        {},
        "only 1 of 40 documents is left after cleaning and deduplication (39 exact",
    ),
    "a validation split smaller than one window": (
        lambda tmp: _english(300),  # ~110k tokens to train on, 1 document (~400 tokens) to validate on
        {
            "model": {"contextLength": 512},
            "training": {"sequenceLength": 512},
            "data": {"sharding": {"validationFraction": 0.001}},
        },
        "val split has",
    ),
}


@pytest.mark.parametrize("case", PREPARE_CASES)
def test_prepare_refuses_a_corpus_that_cannot_make_a_training_set(tmp_path: Path, case: str) -> None:
    texts, spec, cause = PREPARE_CASES[case]
    source = _jsonl(tmp_path / "docs.jsonl", texts(tmp_path))
    data_dir = tmp_path / "data"
    data = {**spec.get("data", {}), "sources": [{"uri": str(source)}]}
    config = debug_config(tmp_path, data_dir, {**spec, "data": data})
    line, message = refused(["prepare", str(config)], tmp_path)
    assert cause in line and message.extra["stage"] == "prepare"
    assert not (data_dir / MANIFEST_FILE).exists(), "nothing committed"
    assert not list(data_dir.glob(".prepare-tmp-*")), "no half-written output left behind"


def test_too_few_tokens_names_the_split_and_what_needs_them(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "docs.jsonl", _english(6))
    spec = {"model": {"contextLength": 512}, "training": {"sequenceLength": 512}}
    config = debug_config(tmp_path, tmp_path / "data", {**spec, "data": {"sources": [{"uri": str(source)}]}})
    line, _ = refused(["prepare", str(config)], tmp_path)
    assert "train split has" in line and "fewer than the 4097 that one global micro-batch" in line


# --- train -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"), license_documents()[:40])


def _copy(shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "data"))


def _no_val(data: Path) -> None:  # what a duplicate-only corpus used to commit: an empty val split
    manifest = json.loads((data / MANIFEST_FILE).read_text())
    manifest["splits"]["val"] = []
    (data / MANIFEST_FILE).write_text(json.dumps(manifest))


def _truncate_shard(data: Path) -> None:
    with open(data / "train-00000.bin", "r+b") as fh:
        fh.truncate(100)


TRAIN_CASES: dict[str, tuple[Callable[[Path], None], dict[str, Any], str]] = {
    "no manifest": (
        lambda d: (d / MANIFEST_FILE).unlink(),
        {},
        "manifest.json not found: run `llmtrain prepare` first",
    ),
    "empty val split": (_no_val, {}, "val split has 0 tokens, fewer than the 65 that validation needs"),
    "train split smaller than a global micro-batch": (
        lambda d: None,
        {"training": {"microBatchSize": 128, "globalBatchSize": 128}},  # 40 documents: ~6600 tokens
        "fewer than the 8193 that one global micro-batch (microBatchSize 128 x 1 processes) needs",
    ),
    "truncated shard": (_truncate_shard, {}, "train-00000.bin: 100 bytes, but manifest.json records"),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_refuses_data_it_cannot_train_on(shards: Path, tmp_path: Path, case: str) -> None:
    damage, spec, cause = TRAIN_CASES[case]
    data = _copy(shards, tmp_path)
    damage(data)
    config = debug_config(tmp_path, data, spec)
    line, message = refused(["train", str(config)], tmp_path)
    assert cause in line and message.extra["stage"] == "train"
    assert not (tmp_path / "checkpoints").exists(), "nothing was started"


def test_a_worker_pod_refuses_before_its_launcher_starts_torchrun(shards: Path, tmp_path: Path) -> None:
    # torchrun exits 1 whatever its workers return: the check must happen before it starts.
    data = _copy(shards, tmp_path)
    _no_val(data)
    line, _ = refused(["train", str(debug_config(tmp_path, data))], tmp_path, NPROC_PER_NODE="1", NNODES="1")
    assert "val split has 0 tokens" in line


def test_a_worker_pod_of_an_elastic_gang_refuses_a_size_that_breaks_the_global_batch(
    shards: Path, tmp_path: Path
) -> None:
    # The operator picks only sizes that keep globalBatchSize; a pod that says another (edited by
    # hand, or an older operator) is refused before torchrun, with the sizes that would train.
    spec = {
        "training": {"globalBatchSize": 16, "microBatchSize": 4},
        "workers": {"numNodes": 2, "minNodes": 1, "maxNodes": 4, "procsPerNode": 1},
    }
    config = debug_config(tmp_path, _copy(shards, tmp_path), spec)
    line, _ = refused(["train", str(config)], tmp_path, NPROC_PER_NODE="1", NNODES="3")
    assert "WORLD_SIZE=3 is not a size this elastic gang trains at: allowed [1, 2, 4]" in line


# --- compress, serve, export-onnx --------------------------------------------------------------------


def _compress_config(tmp_path: Path, data: Path, model: bool, **spec: Any) -> Path:
    config = debug_config(tmp_path, data, spec)
    if model:
        (tmp_path / "output" / "model").mkdir(parents=True)
        (tmp_path / "output" / "model" / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    return config


QUANTIZE = {"quantization": [{"method": "Int8WeightOnly"}]}
COMPRESS_CASES: dict[str, tuple[str, bool, dict[str, Any], str, str]] = {
    "no trained model": ("quantize-0", False, QUANTIZE, "ok", "(config.json: No such file or directory)"),
    "no data": ("quantize-0", True, QUANTIZE, "missing", "manifest.json not found"),
    "evaluation without a val split": ("quantize-0", True, QUANTIZE, "no-val", "val split has 0 tokens"),
    "distillation on a train split too small": (
        "distill",
        True,
        {"distillation": {"student": STUDENT}},
        "tiny-train",
        "train split has",
    ),
}


@pytest.mark.parametrize("case", COMPRESS_CASES)
def test_compress_refuses_a_missing_model_or_unusable_data(shards: Path, tmp_path: Path, case: str) -> None:
    stage, model, compression, data_state, cause = COMPRESS_CASES[case]
    data = _copy(shards, tmp_path)
    if data_state == "missing":
        shutil.rmtree(data)
    elif data_state == "no-val":
        _no_val(data)
    spec: dict[str, Any] = {"compression": compression}
    if data_state == "tiny-train":  # 128 windows of 64 tokens per micro-batch: more than 40 documents hold
        spec["training"] = {"microBatchSize": 128, "globalBatchSize": 128}
    config = _compress_config(tmp_path, data, model, **spec)
    line, message = refused(["compress", str(config), "--stage", stage], tmp_path)
    assert cause in line and message.extra["stage"] == stage
    assert not (tmp_path / "output" / "compressed").exists()


@pytest.mark.parametrize("command", ["serve", "export-onnx"])
def test_serving_and_export_refuse_a_missing_model_directory(tmp_path: Path, command: str) -> None:
    empty = tmp_path / "model"
    empty.mkdir()
    args = ["--model-dir", str(empty)] + (
        ["--out", str(tmp_path / "onnx")] if command == "export-onnx" else []
    )
    line, _ = refused([command, *args], tmp_path, torch=True)
    assert "is not a model directory (no config.json)" in line


def test_a_config_with_several_bad_fields_is_still_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    raw = yaml.safe_load(debug_config(tmp_path, tmp_path / "data").read_text())
    raw["spec"]["training"].update(microBatchSize=0, logIntervalSteps=0)
    config.write_text(yaml.safe_dump(raw))
    line, _ = refused(["train", str(config)], tmp_path)
    assert "spec.training.microBatchSize" in line and "spec.training.logIntervalSteps" in line


def test_qlora_without_bitsandbytes_is_refused_before_the_launcher(tmp_path: Path) -> None:
    # The CPU image has no bitsandbytes (admission already asks for GPUs): one line, exit 2, no torch.
    from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
    from llmtrain import testing_hf
    from llmtrain.prepare import pipeline

    model = testing_hf.checkpoint("qwen2", tmp_path / "vol" / "base")
    texts = _english(60)
    raw = {
        "paths": {
            "volumeDir": str(tmp_path / "vol"),
            "dataDir": str(tmp_path / "data"),
            "checkpointDir": str(tmp_path / "checkpoints"),
            "outputDir": str(tmp_path / "output"),
        },
        "spec": {
            "model": {"pretrained": {"uri": str(model)}},
            "data": {"sources": [{"uri": str(_jsonl(tmp_path / "docs.jsonl", texts))}]},
            "training": {"maxSteps": 2, "sequenceLength": 32, "microBatchSize": 1, "globalBatchSize": 1},
            "workers": {"gpusPerNode": 1},
        },
    }
    pipeline.run(TrainerConfig.model_validate(raw))
    raw["spec"]["training"]["method"] = "QLoRA"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    line, _ = refused(["train", str(config)], tmp_path, NPROC_PER_NODE="1", NNODES="1")
    assert line.startswith("llmtrain train: spec.training.method: QLoRA needs bitsandbytes"), line
