"""The remote uploader on a local fsspec filesystem: marker last, rotation, retries, the bounded queue.

These drive ``llmtrain.train.remote`` directly (no training, no server), with a filesystem wrapper that
records every operation and can fail or stall on demand. The real runs against an S3 server are in
test_remote_checkpoints.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.local import LocalFileSystem
from prometheus_client import CollectorRegistry

from llmop_contract.remote import MARKER
from llmtrain.logs import Logger
from llmtrain.train import remote
from llmtrain.train.integrity import MANIFEST, write_manifest
from llmtrain.train.remote import Backoff, RemoteMetrics, Store, Uploader, complete_checkpoints


class Recording(LocalFileSystem):  # type: ignore[misc]
    """A local filesystem that logs puts/pipes/removals, and fails or waits when told to."""

    cachable = False  # fsspec would hand every test the same instance, with the last test's settings

    def __init__(self) -> None:
        super().__init__(auto_mkdir=True)
        self.ops: list[tuple[str, str]] = []
        self.fail_puts = 0
        self.error = "Could not connect to the endpoint URL: http://127.0.0.1:9/"
        self.gate: threading.Event | None = None

    def put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None:
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail_puts:
            self.fail_puts -= 1
            raise ConnectionError(self.error)
        self.ops.append(("put", rpath))
        super().put_file(lpath, rpath, **kwargs)

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        self.ops.append(("pipe", path))
        super().pipe_file(path, value, **kwargs)

    def rm_file(self, path: str) -> None:
        self.ops.append(("rm_file", path))
        super().rm_file(path)

    def rm(self, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
        self.ops.append(("rm", path))
        super().rm(path, recursive=recursive, maxdepth=maxdepth)


def fake_checkpoint(root: Path, step: int) -> Path:
    directory = root / f"step-{step:08d}"
    (directory / "nested").mkdir(parents=True)
    (directory / "mp_rank_00_model_states.pt").write_bytes(b"weights %d " % step * 5000)
    (directory / "nested" / "rng-rank00000.pt").write_bytes(b"rng %d" % step)
    write_manifest(directory, step)
    return directory


@pytest.fixture
def no_objectstore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failures here are connection errors: not a user-fixable problem (objectstore is not under test)."""
    monkeypatch.setattr(remote, "user_problem", lambda exc, uri, field: None)


_made: list[Uploader] = []


@pytest.fixture(autouse=True)
def _close_uploaders() -> Iterator[None]:
    """Stop each test's worker threads, so that none goes on retrying into the next test."""
    yield
    while _made:
        _made.pop().close()


def uploader(tmp_path: Path, fs: Recording, keep_last: int = 2, max_pending: int = 2) -> Uploader:
    store = Store(fs, str(tmp_path / "bucket" / "job"), "s3://bucket/job")
    log = Logger(0, json_lines=True)
    up = Uploader(store, keep_last, max_pending, log, RemoteMetrics(), Backoff(0.01, 0.05))
    _made.append(up)
    return up


def logged(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


# Keyed by id() with the metrics object kept alive beside its registry: an id is only unique while its
# object lives, and a registry found under the id of a collected RemoteMetrics held that object's
# series, so a later uploader's gauges read as that dead one's (a flaky 0 instead of 2).
_registries: dict[int, tuple[RemoteMetrics, CollectorRegistry]] = {}


def value(up: Uploader, name: str) -> float:
    """A sample of ``up``'s series, read through a registry as the /metrics endpoint would."""
    if id(up.metrics) not in _registries:
        registry = CollectorRegistry()
        up.metrics.register(registry)
        _registries[id(up.metrics)] = (up.metrics, registry)
    metrics, registry = _registries[id(up.metrics)]
    assert metrics is up.metrics
    found = registry.get_sample_value(name)
    assert found is not None, name
    return found


def test_a_checkpoint_is_complete_remotely_only_once_its_marker_is_written_last(
    tmp_path: Path, no_objectstore: None
) -> None:
    fs = Recording()
    up = uploader(tmp_path, fs)
    local = fake_checkpoint(tmp_path / "volume", 10)
    up.submit_checkpoint(local.name, local, 10)
    assert up.drain(time.monotonic() + 30, 30)
    remote_dir = tmp_path / "bucket" / "job" / "checkpoints" / "step-00000010"
    assert fs.ops[-1] == ("pipe", str(remote_dir / MARKER))
    puts = [path for op, path in fs.ops if op == "put"]
    assert sorted(puts) == sorted(
        str(remote_dir / n) for n in ("mp_rank_00_model_states.pt", "nested/rng-rank00000.pt", MANIFEST)
    )
    marker = json.loads((remote_dir / MARKER).read_text())
    assert marker["step"] == 10 and set(marker["files"]) == {
        "mp_rank_00_model_states.pt",
        "nested/rng-rank00000.pt",
        MANIFEST,
    }
    assert value(up, "llmtrain_remote_checkpoint_step") == 10
    assert value(up, "llmtrain_remote_uploads_pending") == 0

    # A second tree without a marker (an upload cut short) is not a checkpoint for a restore.
    half = tmp_path / "bucket" / "job" / "checkpoints" / "step-00000020"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert [(s, t) for s, t, _ in complete_checkpoints(up.store)] == [(10, "step-00000010")]

    # And what was uploaded comes back byte for byte and verifies.
    marker_read = up.store.read_marker("checkpoints/step-00000010")
    assert marker_read is not None
    assert (
        remote.download_checkpoint(
            up.store, "checkpoints/step-00000010", marker_read, tmp_path / "restored", "step-00000010"
        )
        is None
    )
    restored = tmp_path / "restored" / "step-00000010"
    assert (restored / "mp_rank_00_model_states.pt").read_bytes() == (
        local / "mp_rank_00_model_states.pt"
    ).read_bytes()


def test_a_download_that_does_not_match_its_marker_is_not_put_in_place(
    tmp_path: Path, no_objectstore: None
) -> None:
    fs = Recording()
    up = uploader(tmp_path, fs)
    local = fake_checkpoint(tmp_path / "volume", 10)
    up.submit_checkpoint(local.name, local, 10)
    assert up.drain(time.monotonic() + 30, 30)
    states = tmp_path / "bucket" / "job" / "checkpoints" / "step-00000010" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[-1] ^= 1  # same size: only the checksum can tell
    states.write_bytes(bytes(data))
    marker = up.store.read_marker("checkpoints/step-00000010")
    assert marker is not None
    wrong = remote.download_checkpoint(
        up.store, "checkpoints/step-00000010", marker, tmp_path / "restored", "step-00000010"
    )
    assert wrong is not None and "checksum" in wrong and "mp_rank_00_model_states.pt" in wrong
    assert not (tmp_path / "restored" / "step-00000010").exists()
    assert not list((tmp_path / "restored").glob(".tmp-*"))


def test_remote_rotation_keeps_keep_last_complete_checkpoints_and_removes_the_marker_first(
    tmp_path: Path, no_objectstore: None
) -> None:
    fs = Recording()
    up = uploader(tmp_path, fs, keep_last=2)
    base = tmp_path / "bucket" / "job" / "checkpoints"
    for step in (10, 20, 30):
        local = fake_checkpoint(tmp_path / "volume", step)
        up.submit_checkpoint(local.name, local, step)
        assert up.drain(time.monotonic() + 30, 30)
    assert sorted(p.name for p in base.iterdir()) == ["step-00000020", "step-00000030"]
    after = fs.ops[fs.ops.index(("pipe", str(base / "step-00000030" / MARKER))) :]
    removals = [(op, path) for op, path in after if op in ("rm_file", "rm") and "step-00000010" in path]
    assert removals[0] == ("rm_file", str(base / "step-00000010" / MARKER))
    assert removals[1][0] == "rm"


def test_failed_attempts_are_counted_warned_and_retried_until_the_upload_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_objectstore: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-never-logged")
    fs = Recording()
    fs.fail_puts = 3
    # An SDK error that echoes a credential: the WARNING lines must not repeat it.
    fs.error = "Could not connect to the endpoint URL: http://127.0.0.1:9/ (key s3cr3t-value-never-logged)"
    up = uploader(tmp_path, fs)
    local = fake_checkpoint(tmp_path / "volume", 10)
    up.submit_checkpoint(local.name, local, 10)
    assert up.drain(time.monotonic() + 30, 30)
    records = logged(capsys)
    failed = [r for r in records if r["event"] == "remote_upload_failed"]
    assert [r["attempt"] for r in failed] == [1, 2, 3]
    assert all(r["level"] == "WARNING" and "Could not connect" in r["error"] for r in failed)
    assert [r["retry_in_seconds"] for r in failed] == [0.01, 0.02, 0.04]  # exponential backoff
    assert any(r["event"] == "remote_upload_recovered" for r in records)
    assert value(up, "llmtrain_remote_upload_failures_total") == 3
    assert value(up, "llmtrain_remote_upload_failing") == 0
    assert (tmp_path / "bucket" / "job" / "checkpoints" / "step-00000010" / MARKER).is_file()
    assert "s3cr3t-value-never-logged" not in json.dumps(records)


def test_a_full_queue_makes_the_save_wait_and_queued_checkpoints_are_protected(
    tmp_path: Path, no_objectstore: None
) -> None:
    fs = Recording()
    fs.gate = threading.Event()  # uploads stall until released
    up = uploader(tmp_path, fs, max_pending=2)
    volume = tmp_path / "volume"
    first, second, third = (fake_checkpoint(volume, s) for s in (10, 20, 30))
    assert up.submit_checkpoint(first.name, first, 10) < 0.5
    assert up.submit_checkpoint(second.name, second, 20) < 0.5
    assert up.protected() == {"step-00000010", "step-00000020"}
    assert value(up, "llmtrain_remote_uploads_pending") == 2
    waited: list[float] = []
    saver = threading.Thread(target=lambda: waited.append(up.submit_checkpoint(third.name, third, 30)))
    saver.start()
    time.sleep(0.5)
    assert saver.is_alive(), "a third save must wait while two uploads are pending"
    fs.gate.set()
    saver.join(30)
    assert waited and waited[0] >= 0.4
    assert up.drain(time.monotonic() + 30, 30)
    assert value(up, "llmtrain_remote_upload_wait_seconds_total") >= 0.4
    assert up.protected() == set()


def test_while_uploads_fail_a_newer_checkpoint_supersedes_the_queued_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_objectstore: None
) -> None:
    fs = Recording()
    fs.fail_puts = 10**6
    up = uploader(tmp_path, fs, max_pending=1)
    volume = tmp_path / "volume"
    first, second = fake_checkpoint(volume, 10), fake_checkpoint(volume, 20)
    up.submit_checkpoint(first.name, first, 10)
    deadline = time.monotonic() + 10
    while value(up, "llmtrain_remote_upload_failing") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    up.submit_checkpoint(second.name, second, 20)
    assert time.monotonic() - started < 1, "a failing upload must not hold the training loop"
    assert up.protected() == {"step-00000020"}
    assert not up.drain(time.monotonic() + 0.5, 30), "nothing can be uploaded"
    fs.fail_puts = 0
    assert up.drain(time.monotonic() + 30, 30)
    base = tmp_path / "bucket" / "job" / "checkpoints"
    assert (base / "step-00000020" / MARKER).is_file() and not (base / "step-00000010" / MARKER).exists()
    superseded = [r for r in logged(capsys) if r["event"] == "remote_upload_superseded"]
    assert [(r["checkpoint"], r["by"]) for r in superseded] == [("step-00000010", "step-00000020")]


def test_drain_gives_up_once_uploads_have_failed_for_the_give_up_time(
    tmp_path: Path, no_objectstore: None
) -> None:
    fs = Recording()
    fs.fail_puts = 10**6
    up = uploader(tmp_path, fs)
    local = fake_checkpoint(tmp_path / "volume", 10)
    up.submit_checkpoint(local.name, local, 10)
    started = time.monotonic()
    assert not up.drain(started + 60, 0.5)
    assert time.monotonic() - started < 10
    assert up.last_error is not None and "Could not connect" in up.last_error
    assert not (tmp_path / "bucket" / "job" / "checkpoints" / "step-00000010" / MARKER).exists()


def test_local_rotation_keeps_a_checkpoint_still_waiting_for_upload(tmp_path: Path) -> None:
    from llmtrain.train.checkpoint import Checkpointer
    from llmtrain.train.dist import DistEnv

    class Waiting:
        """What the checkpointer asks of storage.remote here: which tags are still queued."""

        def __init__(self) -> None:
            self.queued = {"step-00000010"}

        def protected(self) -> set[str]:
            return set(self.queued)

    root = tmp_path / "checkpoints"
    remote_side = Waiting()
    checkpointer = Checkpointer(root, 1, DistEnv(0, 0, 1), remote=remote_side)  # type: ignore[arg-type]
    for step in (10, 20, 30):
        fake_checkpoint(root, step)
    checkpointer._prune()
    assert sorted(p.name for p in root.iterdir()) == ["step-00000010", "step-00000030"]
    remote_side.queued.clear()  # uploaded: now keepLast 1 applies to it as well
    checkpointer._prune()
    assert sorted(p.name for p in root.iterdir()) == ["step-00000030"]
