"""A real S3-compatible server for the tests: SeaweedFS's `weed server`, bound to 127.0.0.1 only.

It is built like the cluster's binaries (hack/build-cluster-bins.sh, pinned in hack/versions.env).
Authentication is on: one admin identity whose keys are generated per session, so a test that sends
no or wrong credentials is refused exactly as a real object store would refuse it.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import s3fs

REGION = "us-east-1"
LOOPBACK = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports; held open together so the kernel cannot hand one out twice."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL, so a killed
    pytest never leaves a weed server behind."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class S3Server:
    """Starts `weed server` (master, volume, filer, S3 gateway) in a temporary directory."""

    def __init__(self, weed: Path, start_timeout: float = 60.0) -> None:
        self.weed = weed
        self.region = REGION
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_hex(20)
        self.dir = Path(tempfile.mkdtemp(prefix="llmop-s3-"))
        self.log_path = self.dir / "weed.log"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._grpc_ports: dict[str, int] = {}
        self.port = 0
        self.start_seconds = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _config(self) -> Path:
        # The identities file turns authentication on: without it the gateway accepts anonymous
        # requests, which would hide a client that forgot to sign.
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.dir / "s3.json"
        path.write_text(json.dumps(identities))
        path.chmod(0o600)
        return path

    def start(self) -> S3Server:
        data = self.dir / "data"
        data.mkdir()
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        self.port = s3
        self._grpc_ports = {"master": master_grpc, "volume": volume_grpc, "filer": filer_grpc}
        self._grpc_ports["s3"] = s3_grpc
        # Every listener gets an explicit free port (gRPC ports default to http+10000, which may be
        # taken) and binds to loopback; the optional catalogs (Iceberg, Lance) are switched off.
        args = [
            str(self.weed),
            "server",
            f"-dir={data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            # No usage reports to seaweedfs.com (nothing leaves 127.0.0.0/8).
            "-master.telemetry=false",
            # Every bucket is a collection with volumes of its own: small (sparse) volumes and room
            # for many, so a session's buckets never run out of writable volumes.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=200",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.ip.bind={LOOPBACK}",
            f"-s3.localSocket={self.dir / 's3.sock'}",
            # As on AWS, a write to a bucket that does not exist fails instead of creating it
            # (SeaweedFS creates it for admin identities by default), so a missing bucket is caught.
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self._config()}",
        ]
        t0 = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                env=self._env(),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_dir=True)
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    @staticmethod
    def _env() -> dict[str, str]:
        env = dict(os.environ)
        # master.toml's volume_growth.copy_1 through viper's WEED_ prefix: a new bucket grows one
        # volume instead of seven, which keeps the first write to each bucket quick.
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        return env

    def _wait_ready(self) -> None:
        """Until the gateway answers a signed request with success (the filer and a writable volume
        are behind it), not merely until the port is open."""
        deadline = time.monotonic() + self.start_timeout
        last = ""
        probe = f"llmop-ready-{secrets.token_hex(4)}"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.proc.returncode} before S3 answered\n{self.log_tail()}"
                )
            try:
                fs = self.client()
                # exist_ok: an earlier attempt may have created the bucket before its write failed.
                fs.makedirs(probe, exist_ok=True)
                fs.pipe(f"{probe}/probe", b"ok")
                if fs.cat(f"{probe}/probe") == b"ok":
                    fs.rm(probe, recursive=True)
                    return
            except Exception as e:  # not up yet: connection refused, 5xx, no volume yet
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.3)
        raise RuntimeError(
            f"S3 at {self.endpoint} did not answer within {self.start_timeout:.0f}s "
            f"(last error: {last})\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log at {self.log_path}: {e})"
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, keep_dir: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # By PID: weed runs every role in one process and starts no children.
            proc.terminate()
            try:
                # The volume server and filer stop at once, but the master of `weed server` keeps
                # running (retrying volume growth) after SIGTERM; nothing here needs to outlive
                # the session, so it gets a short grace period and then SIGKILL.
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        # Each gRPC server also listens on /tmp/seaweedfs-<role>-grpc-<port>.sock (no flag moves
        # it) and the master's is left behind: remove ours once the process is gone.
        for role, port in self._grpc_ports.items():
            Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rss_bytes(self) -> int:
        """Resident memory of the weed process (from /proc), for the figures."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def env(self) -> dict[str, str]:
        """What an S3 client (boto3, s3fs, the trainer) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, **overrides: Any) -> s3fs.S3FileSystem:
        """A fresh (uncached) s3fs filesystem signed with this server's keys; overrides replace
        key/secret for negative tests."""
        kwargs: dict[str, Any] = {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": self.region},
            "skip_instance_cache": True,
            "use_listings_cache": False,
        }
        kwargs.update(overrides)
        return s3fs.S3FileSystem(**kwargs)

    def make_bucket(self, name: str) -> str:
        """Creates the bucket; returns its name."""
        self.client().mkdir(name)
        return name

    def credentials_secret(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        """A Kubernetes Secret manifest holding the keys, for the cluster tests."""
        meta: dict[str, Any] = {"name": name}
        if namespace:
            meta["namespace"] = namespace
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta,
            "type": "Opaque",
            "stringData": {
                "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
            },
        }
