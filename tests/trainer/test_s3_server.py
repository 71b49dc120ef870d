"""The tests' S3 server behaves like an object store the trainer will meet: authenticated, strict
about buckets, and reachable through fsspec with nothing but the endpoint and the keys."""

from __future__ import annotations

import secrets

import fsspec
import psutil
import pytest

from tests.s3server import S3Server


def fs_from_env(s3: S3Server, **overrides: str) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem built the way a pod would build one: from env()'s variables only."""
    env = {**s3.env(), **overrides}
    return fsspec.filesystem(
        "s3",
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
        client_kwargs={"region_name": env["AWS_DEFAULT_REGION"]},
        skip_instance_cache=True,
    )


def test_object_round_trips_through_fsspec(s3: S3Server) -> None:
    bucket = s3.make_bucket(f"rt-{secrets.token_hex(4)}")
    payload = secrets.token_bytes(64 * 1024)
    fs = fs_from_env(s3)
    with fs.open(f"{bucket}/run/checkpoint.bin", "wb") as f:
        f.write(payload)
    # Read back through a second, independent client: the object is on the server, not cached.
    assert s3.client().cat(f"{bucket}/run/checkpoint.bin") == payload
    assert fs.ls(f"{bucket}/run") == [f"{bucket}/run/checkpoint.bin"]


def test_wrong_secret_key_is_refused(s3: S3Server) -> None:
    bucket = s3.make_bucket(f"auth-{secrets.token_hex(4)}")
    s3.client().pipe(f"{bucket}/kept", b"secret data")
    bad = fs_from_env(s3, AWS_SECRET_ACCESS_KEY=secrets.token_hex(20))
    with pytest.raises(PermissionError, match="signature we calculated does not match"):
        bad.pipe(f"{bucket}/intruder", b"x")
    # A read is refused too (HEAD carries no error body, hence the bare 403).
    with pytest.raises(PermissionError, match="Forbidden"):
        bad.cat(f"{bucket}/kept")
    assert not s3.client().exists(f"{bucket}/intruder")


def test_missing_bucket_is_an_error(s3: S3Server) -> None:
    fs = s3.client()
    missing = f"missing-{secrets.token_hex(4)}"
    # A write must not create the bucket behind the caller's back (SeaweedFS's default does).
    with pytest.raises(FileNotFoundError, match="bucket does not exist"):
        fs.pipe(f"{missing}/x", b"x")
    with pytest.raises(FileNotFoundError, match="bucket does not exist"):
        fs.ls(missing)
    assert missing not in [b.rstrip("/") for b in fs.ls("")]


def test_credentials_secret_holds_keys_that_work(s3: S3Server) -> None:
    secret = s3.credentials_secret("s3-creds", namespace="team-a")
    assert (secret["kind"], secret["metadata"]) == ("Secret", {"name": "s3-creds", "namespace": "team-a"})
    # A pod gets exactly these two variables from the Secret; they must open the store.
    fs = fs_from_env(s3, **secret["stringData"])
    bucket = s3.make_bucket(f"sec-{secrets.token_hex(4)}")
    fs.pipe(f"{bucket}/ok", b"1")
    assert s3.client().cat(f"{bucket}/ok") == b"1"


def test_server_listens_on_loopback_only(s3: S3Server) -> None:
    assert s3.proc is not None
    listening = [
        c.laddr
        for c in psutil.Process(s3.proc.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN or not c.raddr  # TCP listeners and bound UDP sockets
    ]
    # Master, volume, filer and S3, each with its gRPC port.
    assert len(listening) >= 8
    assert {addr.ip for addr in listening} == {"127.0.0.1"}, listening
