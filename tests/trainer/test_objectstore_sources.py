"""Data sources and pretrained models in S3, read from the tests' real S3 server (SeaweedFS).

Credentials reach the trainer the way the operator hands them to a pod: AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY in the environment (from storage.objectStore.credentialsSecret) and the endpoint
in spec.storage.objectStore. Nothing else of AWS is in the environment: no config files, no instance
metadata (which would leave 127.0.0.0/8), no endpoint variable, so a test passes only if the spec's
settings are what the trainer used.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmop_contract.api.v1alpha1.trainer_config import TrainerConfig
from llmop_contract.protocol import MANIFEST_FILE, TerminationMessage
from llmtrain import corpus, objectstore, sources, testing_hf
from llmtrain.config import DataError
from llmtrain.testing import debug_config
from tests.s3server import S3Server, free_ports
from tests.trainer.conftest import train_env

DOCS = [str(r["text"]) for r in corpus.load("english")[:300]]


def pod_env(tmp: Path, s3: S3Server, **override: str) -> dict[str, str]:
    """train_env() with only the keys a pod gets from the credentials Secret."""
    env = {k: v for k, v in train_env().items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=s3.access_key,
        AWS_SECRET_ACCESS_KEY=s3.secret_key,
        # Hermetic: no ~/.aws files, and no instance-metadata lookup (169.254.169.254) for credentials.
        AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        LLMOP_TERMINATION_LOG=str(tmp / "termination-log"),
    )
    env.update(override)
    return env


def store_spec(s3: S3Server, endpoint: str | None = None) -> dict[str, Any]:
    return {
        "objectStore": {"endpoint": endpoint or s3.endpoint, "region": s3.region, "addressingStyle": "Path"}
    }


def bucket(s3: S3Server, what: str) -> str:
    return s3.make_bucket(f"{what}-{secrets.token_hex(4)}")


def upload_dir(s3: S3Server, local: Path, url: str) -> None:
    fs = s3.client()
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.pipe(f"{url.removeprefix('s3://')}/{f.relative_to(local).as_posix()}", f.read_bytes())


def corpus_files(root: Path) -> Path:
    """The corpus as two files, gzipped JSONL and plain JSONL, so a prefix and decompression are read."""
    root.mkdir(parents=True)
    half = len(DOCS) // 2
    lines = [json.dumps({"text": t}) + "\n" for t in DOCS]
    (root / "part-0.jsonl.gz").write_bytes(gzip.compress("".join(lines[:half]).encode()))
    (root / "part-1.jsonl").write_text("".join(lines[half:]))
    return root


def prepare(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "prepare", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def prepared(data_dir: Path) -> dict[str, Any]:
    """What prepare produced, minus what names the input's location (the per-source counts' keys, the
    config hash over the inputs' fingerprints) and the timings."""
    manifest = json.loads((data_dir / MANIFEST_FILE).read_text())
    del manifest["config_hash"]
    stats = manifest["stats"]
    stats["sources"] = list(stats["sources"].values())
    del stats["seconds"], stats["docs_per_second"]
    files = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(data_dir.iterdir())
        if f.is_file() and f.suffix in (".bin", ".json") and f.name != MANIFEST_FILE
    }
    return {"manifest": manifest, "files": files}


def test_prepare_reads_an_s3_prefix_exactly_as_the_same_files_on_disk(tmp_path: Path, s3: S3Server) -> None:
    local = corpus_files(tmp_path / "corpus")
    url = f"s3://{bucket(s3, 'corpus')}/datasets/english"
    upload_dir(s3, local, url)

    results = {}
    for name, uri, storage in [("local", str(local), {}), ("s3", url, store_spec(s3))]:
        work = tmp_path / name
        config = debug_config(work, work / "data", {"data": {"sources": [{"uri": uri}]}, "storage": storage})
        done = prepare(config, pod_env(work, s3))
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = prepared(work / "data")

    assert results["s3"]["manifest"]["stats"]["documents_in"] == len(DOCS), "both files, one decompressed"
    assert results["s3"] == results["local"]
    assert results["s3"]["files"], "shards were compared"

    # The objects' sizes and modification times fingerprint the input: unchanged, a re-run is a no-op.
    again = prepare(tmp_path / "s3" / "config.yaml", pod_env(tmp_path / "s3", s3))
    assert again.returncode == 0 and "is up to date" in again.stderr, again.stderr[-2000:]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    tok = testing_hf.tokenizer(root / "tok")
    return testing_hf.checkpoint("llama", root / "llama", seed=0, tokenizer_dir=tok)


def pretrained_config(work: Path, model: str, source: str, storage: dict[str, Any]) -> Path:
    raw = {
        "paths": {"dataDir": str(work / "data"), "volumeDir": str(work / "volume")},
        "spec": {
            "model": {"pretrained": {"uri": model}},
            "training": {"maxSteps": 1, "sequenceLength": 16, "microBatchSize": 2, "globalBatchSize": 2},
            "data": {
                "sources": [{"uri": source}],
                "format": {"type": "Text"},
                "numWorkers": 1,
                "cleaning": {"minWords": 1},
                "deduplication": {"near": {"enabled": False}},
                "sharding": {"tokensPerShard": 1024, "validationFraction": 0.2},
            },
            "storage": storage,
        },
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_pretrained_model_and_its_corpus_come_from_s3(
    tmp_path: Path, s3: S3Server, checkpoint: Path
) -> None:
    name = bucket(s3, "models")
    model_url, corpus_url = f"s3://{name}/base/llama", f"s3://{name}/corpus"
    upload_dir(s3, checkpoint, model_url)
    local_corpus = corpus_files(tmp_path / "corpus")
    upload_dir(s3, local_corpus, corpus_url)

    results = {}
    for kind, model, data, storage in [
        ("local", str(checkpoint), str(local_corpus), {}),
        ("s3", model_url, corpus_url, store_spec(s3)),
    ]:
        work = tmp_path / kind
        done = prepare(pretrained_config(work, model, data, storage), pod_env(work, s3))
        assert done.returncode == 0, done.stderr[-3000:]
        results[kind] = prepared(work / "data")
    assert results["s3"] == results["local"], "the model's tokenizer read from S3 tokenised the same corpus"

    # The copy on the volume is the checkpoint, file for file, with its marker.
    (copy,) = [p for p in (tmp_path / "s3" / "volume" / sources.OBJECT_CACHE).iterdir()]
    want = {f.name: f.read_bytes() for f in checkpoint.iterdir() if f.is_file()}
    got = {f.name: f.read_bytes() for f in copy.iterdir() if f.is_file() and f.name != ".llmop-complete"}
    assert got == want and (copy / ".llmop-complete").is_file()


# --- refusals: exit 2, a line naming the field and the URL, no credential anywhere -------------------


def closed_port() -> int:
    (port,) = free_ports(1)  # nothing listens there once free_ports has closed its socket
    return port


CASES = ["wrong secret key", "missing bucket", "unreachable endpoint"]


def _refusal_case(case: str, s3: S3Server, name: str) -> tuple[str, dict[str, str], str | None, str]:
    """(URL prefix, env overrides, endpoint override, what the line must say) for ``case``."""
    if case == "wrong secret key":
        return (
            f"s3://{name}",
            {"AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)},
            None,
            "access denied to s3://{name}/{rest} (",
        )
    if case == "missing bucket":
        gone = f"gone-{secrets.token_hex(4)}"
        return f"s3://{gone}", {}, None, f"bucket '{gone}' of s3://{gone}/{{rest}} does not exist"
    port = closed_port()
    return (
        f"s3://{name}",
        {},
        f"http://127.0.0.1:{port}",
        f"cannot reach the object store at http://127.0.0.1:{port} for s3://{name}/{{rest}} (",
    )


def refused(config: Path, env: dict[str, str]) -> tuple[str, str]:
    """Run prepare; assert exit 2, no traceback, the refusal as its last stderr line and in the
    termination message. Returns the line and everything the process wrote."""
    done = prepare(config, env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    line = done.stderr.strip().splitlines()[-1]
    termination = Path(env["LLMOP_TERMINATION_LOG"]).read_text()
    message = TerminationMessage.decode(termination)
    assert message.extra["exitCode"] == 2 and line == "llmtrain prepare: " + message.extra["message"]
    print(line)
    return line, done.stdout + done.stderr + termination


def assert_no_credentials(text: str, env: dict[str, str], s3: S3Server) -> None:
    for value in {s3.access_key, s3.secret_key, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]}:
        assert value not in text


@pytest.mark.parametrize("case", CASES)
def test_an_unusable_data_source_is_refused_naming_it(tmp_path: Path, s3: S3Server, case: str) -> None:
    name = bucket(s3, "data")
    upload_dir(s3, corpus_files(tmp_path / "corpus"), f"s3://{name}/corpus")
    prefix, env_override, endpoint, says = _refusal_case(case, s3, name)
    uri = f"{prefix}/corpus"
    config = debug_config(
        tmp_path,
        tmp_path / "data",
        {"data": {"sources": [{"uri": uri}]}, "storage": store_spec(s3, endpoint)},
    )
    env = pod_env(tmp_path, s3, **env_override)
    line, everything = refused(config, env)
    assert line.startswith("llmtrain prepare: spec.data.sources[0].uri: "), line
    assert says.format(name=name, rest="corpus") in line, line
    if case == "wrong secret key":
        assert line.endswith("check storage.objectStore.credentialsSecret"), line
    assert_no_credentials(everything, env, s3)
    assert not (tmp_path / "data" / MANIFEST_FILE).exists()


@pytest.mark.parametrize("case", CASES)
def test_an_unusable_pretrained_model_is_refused_naming_it(
    tmp_path: Path, s3: S3Server, checkpoint: Path, case: str
) -> None:
    name = bucket(s3, "model")
    upload_dir(s3, checkpoint, f"s3://{name}/llama")
    prefix, env_override, endpoint, says = _refusal_case(case, s3, name)
    # The corpus is local, so the model is the only thing in S3.
    local = corpus_files(tmp_path / "corpus")
    config = pretrained_config(tmp_path, f"{prefix}/llama", str(local), store_spec(s3, endpoint))
    env = pod_env(tmp_path, s3, **env_override)
    line, everything = refused(config, env)
    assert line.startswith("llmtrain prepare: spec.model.pretrained.uri: "), line
    assert says.format(name=name, rest="llama") in line, line
    assert_no_credentials(everything, env, s3)
    cache = tmp_path / "volume" / sources.OBJECT_CACHE
    assert not cache.exists() or not list(cache.iterdir()), "no partial copy left on the volume"


# --- an interrupted copy is redone --------------------------------------------------------------------


def in_process_cfg(tmp_path: Path, s3: S3Server, uri: str, monkeypatch: pytest.MonkeyPatch) -> TrainerConfig:
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in pod_env(tmp_path, s3).items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    return TrainerConfig.model_validate(
        yaml.safe_load(
            pretrained_config(tmp_path, uri, str(tmp_path / "unused.jsonl"), store_spec(s3)).read_text()
        )
    )


def test_a_copy_cut_short_is_not_trusted_and_is_redone(
    tmp_path: Path, s3: S3Server, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{bucket(s3, 'cut')}/llama"
    upload_dir(s3, checkpoint, url)
    cfg = in_process_cfg(tmp_path, s3, url, monkeypatch)
    want = {f.name: f.read_bytes() for f in checkpoint.iterdir() if f.is_file()}
    assert len(want) > 2

    # The connection drops after the first file: a transient failure, so a crash (retried by the
    # operator), not a refusal, and nothing on the volume that a later stage would take for the model.
    real = objectstore.filesystem

    def flaky(store: Any, u: str) -> Any:
        fs, root = real(store, u)
        calls = {"n": 0}
        get_file = fs.get_file

        def cut(rpath: str, lpath: str, **kw: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 2:
                raise ConnectionResetError("connection reset by peer")
            return get_file(rpath, lpath, **kw)

        fs.get_file = cut
        return fs, root

    monkeypatch.setattr(objectstore, "filesystem", flaky)
    with pytest.raises(ConnectionResetError) as raised:
        sources.resolve_model(cfg)
    assert not isinstance(raised.value, DataError)
    cache = Path(cfg.paths.volume_dir) / sources.OBJECT_CACHE
    assert not list(cache.iterdir()), "no copy, complete or partial, is left behind"

    # A copy that lost files after its marker, and one that never got a marker: both copied again.
    monkeypatch.setattr(objectstore, "filesystem", real)
    local = sources.resolve_model(cfg)
    assert {f.name: f.read_bytes() for f in local.iterdir() if f.name != ".llmop-complete"} == want
    for damage in ("truncate a file", "no marker"):
        if damage == "truncate a file":
            (local / "config.json").write_text("{}")
        else:
            (local / ".llmop-complete").unlink()
        assert sources.resolve_model(cfg) == local
        assert {f.name: f.read_bytes() for f in local.iterdir() if f.name != ".llmop-complete"} == want, (
            damage
        )
        assert sources.model_config(cfg).model_type == "llama"


def test_messages_carry_no_credentials_from_urls_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    exc = PermissionError("denied for s3cr3t-value-xyz")
    line = objectstore.problem(
        exc, "s3://AKIAEXAMPLE:s3cr3t-value-xyz@bucket/key", "spec.data.sources[0].uri"
    )
    assert line is not None and line.startswith("spec.data.sources[0].uri: s3://bucket/key")
    assert "s3cr3t" not in line and "AKIAEXAMPLE" not in line
    assert objectstore.problem(RuntimeError("HTTP 503 Slow Down"), "s3://b/k", "f") is None, "transient"


def _sdk_errors() -> list[tuple[str, BaseException, str | None]]:
    """What gcsfs and adlfs raise (their own exception types; no GCS or Azure server here)."""
    from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError, ServiceRequestError
    from gcsfs.retry import HttpError

    no_container = ResourceNotFoundError(message="The specified container does not exist.")
    no_container.error_code = "ContainerNotFound"
    missing = FileNotFoundError("c/k")
    missing.__cause__ = no_container  # adlfs re-raises it as FileNotFoundError from the SDK's error
    return [
        ("az://c/k", ClientAuthenticationError(message="Server failed to authenticate"), "access denied"),
        ("az://c/k", missing, "container 'c' of az://c/k does not exist"),
        ("az://c/k", ServiceRequestError("Cannot connect to host 127.0.0.1:9 ssl:default"), "cannot reach"),
        ("gs://b/k", HttpError({"code": 401, "message": "Invalid Credentials"}), "access denied"),
        ("gs://b/k", OSError("Forbidden: b/k\nno storage.objects.get access"), "(403 Forbidden)"),
        ("gs://b/k", FileNotFoundError("b/k"), "gs://b/k does not exist"),
        ("gs://b/k", HttpError({"code": 503, "message": "Backend Error"}), None),
    ]


@pytest.mark.parametrize("case", range(7))
def test_gcs_and_azure_errors_are_classified_too(case: int) -> None:
    url, exc, says = _sdk_errors()[case]
    line = objectstore.problem(exc, url, "spec.model.pretrained.uri")
    if says is None:
        assert line is None, "a 5xx is transient: a crash the operator retries"
    else:
        assert line is not None and line.startswith("spec.model.pretrained.uri: ") and says in line, line
        assert url in line, "the line names the URL"
