"""Pretrained sources resolve to a local directory, and a bad one is a one-line exit-2 refusal.

The hub case runs huggingface_hub's real snapshot_download against a cache laid out the way the hub
client lays it out (models--ORG--NAME/{refs,snapshots}); no hub is reachable from here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.sources import Source, SourceKind
from llmtrain import sources, testing_hf
from llmtrain.config import DataError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cfg(tmp_path: Path, pretrained: dict[str, object]) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "paths": {"volumeDir": str(tmp_path / "vol")},
            "spec": {
                "model": {"pretrained": pretrained},
                "data": {"sources": [{"uri": "x.jsonl"}]},
                "training": {"maxSteps": 1},
            },
        }
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing_hf.checkpoint("qwen2", tmp_path_factory.mktemp("ckpt") / "qwen2")


def _hub_cache(cache: Path, repo: str, checkpoint: Path, ref: str = "main") -> Path:
    """What snapshot_download leaves behind: blobs, a snapshot of links, and a ref naming it."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for f in checkpoint.iterdir():
        if f.is_file():
            blob = root / "blobs" / f.name
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    (root / "refs").mkdir()
    (root / "refs" / ref).write_text(COMMIT)
    return snap


def test_a_relative_path_is_on_the_job_volume(tmp_path: Path, checkpoint: Path) -> None:
    shutil.copytree(checkpoint, tmp_path / "vol" / "models" / "base")
    cfg = _cfg(tmp_path, {"uri": "models/base"})
    assert sources.resolve_model(cfg) == tmp_path / "vol" / "models" / "base"
    assert sources.model_config(cfg).model_type == "qwen2"
    assert len(sources.load_tokenizer(cfg)) == testing_hf.VOCAB


@pytest.mark.parametrize(
    ("uri", "setup", "says"),
    [
        ("models/missing", None, "does not exist"),
        ("models/file", "file", "is not a directory"),
        ("models/empty", "dir", "has no config.json"),
    ],
)
def test_a_missing_source_names_the_field(tmp_path: Path, uri: str, setup: str | None, says: str) -> None:
    target = tmp_path / "vol" / uri
    target.parent.mkdir(parents=True, exist_ok=True)
    if setup == "file":
        target.write_text("not a model")
    elif setup == "dir":
        target.mkdir()
    with pytest.raises(DataError) as raised:
        sources.resolve_model(_cfg(tmp_path, {"uri": uri}))
    assert str(raised.value).startswith("spec.model.pretrained.uri: ") and says in str(raised.value)


def test_an_architecture_transformers_does_not_know_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    model = tmp_path / "vol" / "m"
    shutil.copytree(checkpoint, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "llmop-unknown-arch"}))
    with pytest.raises(DataError, match="trustRemoteCode is off"):
        sources.model_config(_cfg(tmp_path, {"uri": "m"}))


def test_a_hub_id_resolves_through_the_hub_cache_offline(tmp_path: Path, checkpoint: Path) -> None:
    snap = _hub_cache(tmp_path / "vol" / "hf-cache", "acme/tiny-qwen", checkpoint)
    cfg = _cfg(tmp_path, {"uri": "hf://acme/tiny-qwen", "hub": {"offline": True}})
    assert sources.resolve_model(cfg) == snap
    assert sources.model_config(cfg).model_type == "qwen2"
    with pytest.raises(DataError, match="not in the hub cache"):
        sources.resolve_model(_cfg(tmp_path, {"uri": "hf://acme/other", "hub": {"offline": True}}))


def test_a_revision_resolves_to_its_snapshot(tmp_path: Path, checkpoint: Path) -> None:
    snap = _hub_cache(tmp_path / "vol" / "hf-cache", "acme/tiny-qwen", checkpoint, ref="v1")
    cfg = _cfg(tmp_path, {"uri": "hf://acme/tiny-qwen", "revision": "v1", "hub": {"offline": True}})
    assert sources.resolve_model(cfg) == snap
    missing = _cfg(tmp_path, {"uri": "hf://acme/tiny-qwen", "revision": "v2", "hub": {"offline": True}})
    with pytest.raises(DataError):
        sources.resolve_model(missing)


def test_an_unreachable_mirror_falls_back_to_the_cache_and_is_retried_without_one(
    tmp_path: Path, checkpoint: Path
) -> None:
    # Port 9 on loopback: nothing listens, so the client fails at once, as with a mirror that is down.
    hub = {"endpoint": "http://127.0.0.1:9"}
    snap = _hub_cache(tmp_path / "vol" / "hf-cache", "acme/tiny-qwen", checkpoint)
    assert sources.resolve_model(_cfg(tmp_path, {"uri": "hf://acme/tiny-qwen", "hub": hub})) == snap
    # Any error but DataError: a crash, which the operator retries.
    with pytest.raises(Exception) as raised:
        sources.resolve_model(_cfg(tmp_path, {"uri": "hf://acme/not-cached", "hub": hub}))
    assert not isinstance(raised.value, DataError)


def test_an_object_store_prefix_is_copied_once(tmp_path: Path, checkpoint: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in checkpoint.iterdir():
        if f.is_file():
            fs.pipe(f"/bucket/models/qwen/{f.name}", f.read_bytes())
    cfg = _cfg(tmp_path, {"uri": "models/unused"})
    # The memory filesystem stands in for s3:// here (the storage issue tests the real S3 server).
    local = sources._from_object_store(cfg, Source(SourceKind.OBJECT, "memory://bucket/models/qwen"), "f")
    assert (local / "config.json").read_bytes() == (checkpoint / "config.json").read_bytes()
    fs.rm("/bucket/models/qwen", recursive=True)
    again = sources._from_object_store(cfg, Source(SourceKind.OBJECT, "memory://bucket/models/qwen"), "f")
    assert again == local, "a completed copy is reused"
    with pytest.raises(DataError, match="not a directory"):
        sources._from_object_store(cfg, Source(SourceKind.OBJECT, "memory://bucket/none"), "f")
