"""Checkpoints and models in a real S3 server (SeaweedFS, the ``s3`` fixture) through storage.remote.

What a user relies on: a checkpoint is visible remotely only once complete (marker written last, a tree
without one is never restored); a volume that lost its checkpoints resumes from the remote copy with
the same losses as an uninterrupted run; another job can start from a remote checkpoint
(resumeFrom); the exported model is in the bucket and loads from there; a store the run cannot use is
named, counted and fails the run instead of letting it succeed with its uploads missing.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from llmop_contract.remote import MARKER
from llmtrain.testing import debug_config, license_documents, write_shards
from llmtrain.train.dist import free_port
from llmtrain.train.integrity import sha256_file
from tests.s3server import S3Server
from tests.trainer.ranks import TORCHRUN, TRAIN, env, events, torchrun
from tests.trainer.test_train_features import run_train, snapshot

pytestmark = pytest.mark.slow

FAST_RETRIES = {
    "LLMTRAIN_REMOTE_BACKOFF_SECONDS": "0.2",
    "LLMTRAIN_REMOTE_BACKOFF_MAX_SECONDS": "1",
    "LLMTRAIN_REMOTE_GIVE_UP_SECONDS": "6",
    "LLMTRAIN_REMOTE_DRAIN_SECONDS": "120",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"), license_documents()[:300])


def credentials(s3: S3Server, **overrides: str) -> dict[str, str]:
    """The keys as a pod gets them from the credentials Secret; the endpoint comes from the spec."""
    out = {k: v for k, v in s3.env().items() if k.startswith("AWS_") and "ENDPOINT" not in k}
    return {**out, **overrides, **FAST_RETRIES}


def remote_spec(
    endpoint: str, uri: str, steps: int, interval: int, keep_last: int = 2, **training: Any
) -> dict[str, Any]:
    return {
        "storage": {
            "objectStore": {"endpoint": endpoint, "region": "us-east-1", "addressingStyle": "Path"},
            "remote": {"uri": uri},
        },
        "training": {
            "maxSteps": steps,
            "logIntervalSteps": 1,
            "checkpointing": {"intervalSteps": interval, "keepLast": keep_last},
            "evaluation": {"intervalSteps": 1000, "maxBatches": 2},
            **training,
        },
    }


def remote_trees(s3: S3Server, prefix: str) -> dict[str, dict[str, Any] | None]:
    """checkpoint tag -> its marker (None: a tree without one) under ``prefix``/checkpoints."""
    fs = s3.client()
    try:
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{prefix}/checkpoints")]
    except FileNotFoundError:
        return {}
    out: dict[str, dict[str, Any] | None] = {}
    for name in names:
        if not fs.find(f"{prefix}/checkpoints/{name}"):
            continue  # SeaweedFS lists a directory whose objects were all deleted: nothing is there
        try:
            out[name] = json.loads(fs.cat(f"{prefix}/checkpoints/{name}/{MARKER}"))
        except FileNotFoundError:
            out[name] = None
    return out


def assert_complete(s3: S3Server, tree: str, marker: dict[str, Any]) -> None:
    """Every file the marker lists is in ``tree`` with that size (the marker vouches for it)."""
    fs = s3.client()
    for name, entry in marker["files"].items():
        assert fs.size(f"{tree}/{name}") == entry["size"], f"{tree}/{name}"


def losses(log_records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log_records if r.get("event") == "progress"}


# --- one job uploading, another starting from it ----------------------------------------------------


@pytest.fixture(scope="module")
def uploaded_job(s3: S3Server, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A single-process run of 20 steps with a checkpoint every 10, keepLast 1, into a fresh bucket."""
    bucket = s3.make_bucket(f"job-{secrets.token_hex(4)}")
    work = tmp_path_factory.mktemp("uploaded")
    spec = remote_spec(s3.endpoint, f"s3://{bucket}/job-a", 20, 10, keep_last=1)
    termination = work / "termination-log"
    rc, records, output = run_train(
        debug_config(work, data_dir, spec), LLMOP_TERMINATION_LOG=str(termination), **credentials(s3)
    )
    assert rc == 0, output[-4000:]
    return {
        "bucket": bucket,
        "prefix": f"{bucket}/job-a",
        "work": work,
        "records": records,
        "output": output,
        "termination": json.loads(termination.read_text()),
    }


def test_checkpoints_are_uploaded_complete_rotated_and_the_model_loads_from_the_bucket(
    s3: S3Server, uploaded_job: dict[str, Any], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    prefix, work = uploaded_job["prefix"], uploaded_job["work"]
    trees = remote_trees(s3, prefix)
    assert list(trees) == ["step-00000020"], "keepLast 1: the older checkpoint is rotated away remotely too"
    marker = trees["step-00000020"]
    assert marker is not None and marker["step"] == 20
    assert_complete(s3, f"{prefix}/checkpoints/step-00000020", marker)
    local = work / "checkpoints" / "step-00000020"
    for name, entry in marker["files"].items():  # the very files committed on the volume
        assert entry["sha256"] == sha256_file(local / name), name
    uploaded = [r for r in uploaded_job["records"] if r["event"] == "remote_uploaded"]
    assert [r["uri"].rsplit("/", 2)[-2:] for r in uploaded] == [
        ["checkpoints", "step-00000010"],
        ["checkpoints", "step-00000020"],
        ["job-a", "model"],
    ]

    assert uploaded_job["termination"]["modelUri"] == f"s3://{prefix}/model"
    fs = s3.client()
    model_marker = json.loads(fs.cat(f"{prefix}/model/{MARKER}"))
    downloaded = tmp_path / "from-bucket"
    fs.get(f"{prefix}/model/", str(downloaded), recursive=True)
    assert set(model_marker["files"]) == {p.name for p in downloaded.iterdir() if p.name != MARKER}
    model = AutoModelForCausalLM.from_pretrained(downloaded)
    reference = AutoModelForCausalLM.from_pretrained(work / "output" / "model")
    ids = torch.arange(0, 32).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_a_new_job_with_resume_from_starts_at_that_checkpoint(
    s3: S3Server, uploaded_job: dict[str, Any], data_dir: Path, tmp_path: Path
) -> None:
    source = f"s3://{uploaded_job['prefix']}/checkpoints/step-00000020"
    spec = remote_spec(s3.endpoint, f"s3://{uploaded_job['bucket']}/job-b", 30, 10)
    spec["training"]["checkpointing"]["resumeFrom"] = source
    termination = tmp_path / "termination-log"
    config = debug_config(tmp_path / "b", data_dir, spec)
    rc, records, output = run_train(config, LLMOP_TERMINATION_LOG=str(termination), **credentials(s3))
    assert rc == 0, output[-4000:]
    start = next(r for r in records if r["event"] == "start")
    assert start["resumed_from"] == "step-00000020"
    restored = next(r for r in records if r["event"] == "resumed_from_remote")
    assert (restored["uri"], restored["step"]) == (source, 20)
    # What the operator reports the restore from when the run ends before it scraped the metrics.
    message = json.loads(termination.read_text())
    assert (message["resumedFromStep"], message["resumedFromRemote"]) == (20, True), message
    assert uploaded_job["termination"]["resumedFromRemote"] is False
    assert sorted(losses(records)) == list(range(21, 31)), "it trains steps 21..30, not from 1"
    assert next(r for r in records if r["event"] == "done")["step"] == 30
    trees = remote_trees(s3, f"{uploaded_job['bucket']}/job-b")
    assert sorted(t for t, m in trees.items() if m) == ["step-00000020", "step-00000030"]


def test_a_remote_tree_without_its_marker_is_never_loaded(
    s3: S3Server, uploaded_job: dict[str, Any], data_dir: Path, tmp_path: Path
) -> None:
    fs = s3.client()
    prefix = uploaded_job["prefix"]
    half = f"{uploaded_job['bucket']}/half/checkpoints/step-00000020"
    for path in fs.find(f"{prefix}/checkpoints/step-00000020"):
        if not path.endswith(MARKER):  # every file but the marker: an upload cut before its end
            fs.copy(path, half + path.removeprefix(f"{prefix}/checkpoints/step-00000020"))
    spec = remote_spec(s3.endpoint, f"s3://{uploaded_job['bucket']}/job-c", 30, 10)
    spec["training"]["checkpointing"]["resumeFrom"] = f"s3://{half}"
    rc, records, output = run_train(debug_config(tmp_path / "c", data_dir, spec), **credentials(s3))
    assert rc == 2, output[-4000:]
    assert "spec.training.checkpointing.resumeFrom" in output and MARKER in output
    assert not any(r["event"] == "start" for r in records), "nothing was loaded, no training started"
    assert not (tmp_path / "c" / "checkpoints" / "step-00000020").exists()


# --- a volume that lost its checkpoints --------------------------------------------------------------


def two_ranks(spec: dict[str, Any]) -> dict[str, Any]:
    spec["training"].update(
        microBatchSize=4, globalBatchSize=16, lrSchedule={"warmupSteps": 10}
    )  # 2 ranks x 4 x accumulation 2
    spec["deepspeed"] = {
        "zeroStage": 2,
        "communication": {"reduceBucketSize": 50_000, "allgatherBucketSize": 50_000},
    }
    spec["workers"] = {"procsPerNode": 2}
    return spec


def progress(log: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events(log, "progress")}


def test_lost_local_checkpoints_resume_from_the_remote_copy_with_the_same_losses(
    s3: S3Server, data_dir: Path, tmp_path: Path
) -> None:
    bucket = s3.make_bucket(f"lost-{secrets.token_hex(4)}")
    prefix = f"{bucket}/job"
    spec = two_ranks(remote_spec(s3.endpoint, f"s3://{prefix}", 40, 10))
    reference_spec = {k: v for k, v in spec.items() if k != "storage"}
    reference_log = tmp_path / "reference.log"
    assert torchrun(debug_config(tmp_path / "ref", data_dir, reference_spec), reference_log) == 0
    reference = progress(reference_log)
    assert sorted(reference) == list(range(1, 41))

    work = tmp_path / "run"
    config = debug_config(work, data_dir, spec)
    log = work / "train.log"
    fs = s3.client()
    cmd = [*TORCHRUN, f"--master_port={free_port()}", *TRAIN, str(config)]
    with log.open("w") as out:
        agent = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(**credentials(s3)))
        deadline = time.monotonic() + 300
        while not (
            fs.exists(f"{prefix}/checkpoints/step-00000020/{MARKER}") and max(progress(log), default=0) >= 24
        ):
            assert agent.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no step-20 checkpoint in the bucket in time"
            time.sleep(0.05)
        for worker in psutil.Process(agent.pid).children():  # the pod is gone, mid-run
            worker.send_signal(signal.SIGKILL)
        assert agent.wait(timeout=60) != 0
    killed_at = max(progress(log))
    assert killed_at < 40, "the kill landed after the last step"
    shutil.rmtree(work / "checkpoints")  # ... and so is the volume's copy

    complete = sorted(t for t, m in remote_trees(s3, prefix).items() if m)
    newest = complete[-1]
    # A tree newer than every complete one but without its marker (an upload cut by the kill, or
    # planted here): the restore must pass over it.
    planted = f"{prefix}/checkpoints/step-00000035"
    for path in fs.find(f"{prefix}/checkpoints/{newest}"):
        if not path.endswith(MARKER):
            fs.copy(path, planted + path.removeprefix(f"{prefix}/checkpoints/{newest}"))

    assert torchrun(config, log, **credentials(s3)) == 0, log.read_text()[-3000:]
    start = events(log, "start")[-1]
    assert start["resumed_from"] == newest
    restored = events(log, "resumed_from_remote")[-1]
    assert restored["uri"] == f"s3://{prefix}/checkpoints/{newest}"
    resumed = int(newest.removeprefix("step-"))
    after = {s: v for s, v in progress_after(log, start).items()}
    assert sorted(after) == list(range(resumed + 1, 41))
    diffs = [abs(after[s] - reference[s]) for s in after]
    rel = max(d / abs(reference[s]) for d, s in zip(diffs, after, strict=True))
    print(
        f"killed at step ~{killed_at}, local checkpoints deleted, resumed from the remote {newest}: "
        f"{len(after)} steps, max |dloss| vs uninterrupted {max(diffs):.3g} (relative {rel:.3g})"
    )
    assert rel < 1e-5
    trees = remote_trees(s3, prefix)
    assert trees.keys() == {"step-00000030", "step-00000040"}, "rotation removed the rest, planted tree too"
    assert all(m is not None for m in trees.values())


def progress_after(log: Path, start: dict[str, Any]) -> dict[int, float]:
    out: dict[int, float] = {}
    seen = False
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            seen = seen or record == start
            if seen and record.get("event") == "progress":
                out[record["step"]] = record["loss"]
    return out


# --- a store the run cannot use ----------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


@pytest.mark.parametrize("case", ["wrong secret key", "missing bucket", "unreachable endpoint"])
def test_an_unusable_store_fails_the_run_before_training_naming_it(
    case: str, s3: S3Server, data_dir: Path, tmp_path: Path
) -> None:
    bucket = s3.make_bucket(f"bad-{secrets.token_hex(4)}")
    endpoint, overrides = s3.endpoint, {}
    if case == "wrong secret key":
        overrides = {"AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}
    elif case == "missing bucket":
        bucket = f"missing-{secrets.token_hex(4)}"
    else:
        endpoint = f"http://127.0.0.1:{closed_port()}"
    spec = remote_spec(endpoint, f"s3://{bucket}/job", 20, 10)
    keys = credentials(s3, **overrides)
    termination = tmp_path / "termination-log"
    rc, records, output = run_train(
        debug_config(tmp_path, data_dir, spec), LLMOP_TERMINATION_LOG=str(termination), **keys
    )
    assert rc == 2, output[-4000:]
    message = json.loads(termination.read_text())["message"]
    print(f"{case}: {message}")
    assert "spec.storage.remote.uri" in message and "\n" not in message
    assert keys["AWS_SECRET_ACCESS_KEY"] not in output and s3.secret_key not in message
    assert not any(r["event"] == "progress" for r in records), "no training before the store is usable"
    if case != "missing bucket":
        assert s3.client().find(bucket) == [], "nothing was left in the bucket"


class Proxy:
    """A TCP relay to the S3 server that can be cut: the endpoint becomes unreachable mid-run."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.cut_done = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut_done:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_done:
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.cut_done = True
        try:  # shutdown, not only close: close leaves a blocked accept() listening on Linux
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def test_an_endpoint_lost_mid_run_is_counted_warned_and_fails_the_end_of_the_run(
    s3: S3Server, data_dir: Path, tmp_path: Path
) -> None:
    bucket = s3.make_bucket(f"cut-{secrets.token_hex(4)}")
    prefix = f"{bucket}/job"
    proxy = Proxy(s3.port)
    spec = remote_spec(f"http://127.0.0.1:{proxy.port}", f"s3://{prefix}", 60, 10, keep_last=3)
    config = debug_config(tmp_path, data_dir, spec)
    termination = tmp_path / "termination-log"
    extra = {**credentials(s3), "LLMOP_TERMINATION_LOG": str(termination)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtrain.cli", "train", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(**extra),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    fs = s3.client()
    scraped: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 240
        while not fs.exists(f"{prefix}/checkpoints/step-00000010/{MARKER}"):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-30:])
            time.sleep(0.02)
        proxy.cut()
        port = next(json.loads(x)["port"] for x in list(lines) if '"metrics_listening"' in x)
        while not scraped.get("llmtrain_remote_upload_failing"):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-30:])
            if any('"remote_upload_failed"' in x for x in list(lines)):
                scraped = snapshot(port)
            time.sleep(0.05)
        rc = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(30)
    records = [json.loads(x) for x in lines if x.startswith("{")]
    output = "".join(lines)
    assert scraped["llmtrain_remote_upload_failures_total"] >= 1
    assert scraped["llmtrain_remote_checkpoint_step"] >= 10
    failed = [r for r in records if r["event"] == "remote_upload_failed"]
    assert failed and all(r["level"] == "WARNING" and r["error"] for r in failed)
    assert max(losses(records)) == 60, "training went on to the end"
    assert rc != 0, "a run whose uploads are missing must not succeed"
    incomplete = next(r for r in records if r["event"] == "remote_upload_incomplete")
    assert "step-00000060" in incomplete["message"] and f"s3://{prefix}" in incomplete["message"]
    print(f"exit {rc}: {incomplete['message']}")
    trees = remote_trees(s3, prefix)
    assert "step-00000060" not in trees or trees["step-00000060"] is None
    for tag, marker in trees.items():  # whatever has a marker is complete
        if marker is not None:
            assert_complete(s3, f"{prefix}/checkpoints/{tag}", marker)
    assert not fs.exists(f"{prefix}/model/{MARKER}")
    assert s3.secret_key not in output
