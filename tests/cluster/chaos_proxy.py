"""A fault-injecting proxy between the operator and the kube-apiserver, for the chaos test.

The operator talks plain HTTP to 127.0.0.1 (``kubeconfig()`` writes its kubeconfig); the proxy
forwards every request to the cluster's apiserver over TLS with the cluster admin's credentials.
Watch streams pass through untouched, byte for byte as they arrive: a broken watch would test Kopf's
reconnects, not the operator. Of the other requests a configurable fraction is answered with a
transient error instead of being forwarded (500, 503, or 429 with Retry-After, each with a
Kubernetes Status body), so the request never reached the apiserver and the client must retry.
403 and 422 are never injected: the operator treats those as permanent and fails the job.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import ssl
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

log = logging.getLogger("chaos-proxy")

# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself.
_DROP_REQUEST = {"host", "authorization", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"}
_DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length"}
_MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
# Transient errors only: what a loaded or restarting apiserver answers.
_FAULTS = (
    (500, "InternalError", "an injected internal error"),
    (503, "ServiceUnavailable", "the apiserver is (pretend) unavailable"),
    (429, "TooManyRequests", "too many requests (injected throttling)"),
)
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class Fault:
    at: float  # time.monotonic()
    method: str
    path: str
    code: int


@dataclass
class Upstream:
    """Where and as whom the proxy forwards: the cluster kubeconfig's current context."""

    server: str
    ssl: ssl.SSLContext
    token: str | None = None

    @classmethod
    def from_kubeconfig(cls, path: Path) -> Upstream:
        kc = yaml.safe_load(path.read_text())
        ctx_name = kc.get("current-context") or kc["contexts"][0]["name"]
        ctx = next(c["context"] for c in kc["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in kc["clusters"] if c["name"] == ctx["cluster"])
        user = next((u.get("user") or {} for u in kc.get("users", []) if u["name"] == ctx.get("user")), {})
        ctx_ssl = ssl.create_default_context()
        if cluster.get("insecure-skip-tls-verify"):
            ctx_ssl.check_hostname, ctx_ssl.verify_mode = False, ssl.CERT_NONE
        elif data := cluster.get("certificate-authority-data"):
            ctx_ssl.load_verify_locations(cadata=base64.b64decode(data).decode())
        elif ca := cluster.get("certificate-authority"):
            ctx_ssl.load_verify_locations(cafile=ca)
        cert, key = _pem_file(user, "client-certificate"), _pem_file(user, "client-key")
        if cert and key:
            ctx_ssl.load_cert_chain(cert, key)
        return cls(server=cluster["server"].rstrip("/"), ssl=ctx_ssl, token=user.get("token"))


def _pem_file(user: dict[str, Any], key: str) -> str | None:
    """A kubeconfig credential as a file path (ssl wants files; ``-data`` is inline base64)."""
    if data := user.get(f"{key}-data"):
        with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as f:
            f.write(base64.b64decode(data))
        return f.name
    path = user.get(key)
    return str(path) if path else None


def is_watch(request: web.BaseRequest) -> bool:
    return request.query.get("watch", "").lower() in ("true", "1") or "/watch/" in request.path


@dataclass
class Rates:
    """The fraction of non-watch requests answered with an injected fault, by kind."""

    mutating: float = 0.0  # POST, PUT, PATCH, DELETE
    reads: float = 0.0  # GET (lists and gets; never watches)


@dataclass
class ChaosProxy:
    """Run in a thread of its own: ``start()``, ``set_rates()``/``enabled`` at any time, ``stop()``."""

    upstream: Upstream
    seed: int = 0
    rates: Rates = field(default_factory=Rates)
    enabled: bool = False
    port: int = 0
    faults: list[Fault] = field(default_factory=list)
    forwarded: Counter[str] = field(default_factory=Counter)  # method (or "WATCH") -> count
    watch_bytes: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- control, from the test's thread ----------------------------------------------------
    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="chaos-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(30) or not self.port:
            raise RuntimeError("the chaos proxy did not start")

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(30)

    def set_rates(self, mutating: float, reads: float) -> None:
        with self._lock:
            self.rates = Rates(mutating, reads)

    def fault_count(self, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for f in self.faults if f.at >= since)

    def fault_codes(self) -> Counter[int]:
        with self._lock:
            return Counter(f.code for f in self.faults)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig for clients of the proxy: plain HTTP, a token the proxy replaces."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "chaos", "cluster": {"server": self.url()}}],
            "users": [{"name": "chaos", "user": {"token": "chaos-proxy"}}],
            "contexts": [{"name": "chaos", "context": {"cluster": "chaos", "user": "chaos"}}],
            "current-context": "chaos",
        }
        path.write_text(yaml.safe_dump(doc))
        return path

    # -- the server, in its own thread and event loop ---------------------------------------
    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._startup())
        ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _startup(self) -> None:
        # No decompression: bodies (gzip or not) go back exactly as the apiserver sent them.
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(ssl=self.upstream.ssl, limit=200),
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _shutdown(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self._session:
            await self._session.close()

    def _draw_fault(self, request: web.BaseRequest) -> tuple[int, str, str] | None:
        if is_watch(request):
            return None
        with self._lock:
            if not self.enabled:
                return None
            rate = self.rates.mutating if request.method in _MUTATING else self.rates.reads
            if request.method not in _MUTATING and request.method != "GET":
                rate = 0.0  # HEAD, OPTIONS: nothing a client retries on purpose
            if self._random.random() >= rate:
                return None
            fault = self._random.choice(_FAULTS)
            self.faults.append(Fault(time.monotonic(), request.method, request.raw_path, fault[0]))
            return fault

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if fault := self._draw_fault(request):
            code, reason, message = fault
            log.warning("injected %s for %s %s", code, request.method, request.raw_path)
            status: dict[str, Any] = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"chaos proxy: {message}",
                "reason": reason,
                "code": code,
            }
            headers = {}
            if code == 429:
                status["details"] = {"retryAfterSeconds": RETRY_AFTER_SECONDS}
                headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return web.json_response(status, status=code, headers=headers)
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        if self.upstream.token:
            headers["Authorization"] = f"Bearer {self.upstream.token}"
        body = await request.read()
        watch = is_watch(request)
        with self._lock:
            self.forwarded["WATCH" if watch else request.method] += 1
        async with self._session.request(
            request.method,
            self.upstream.server + request.raw_path,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE}
            if not watch:
                payload = await upstream.read()
                return web.Response(status=upstream.status, headers=out_headers, body=payload)
            # A watch: every chunk is passed on as it arrives, for as long as either side keeps it.
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                with self._lock:
                    self.watch_bytes += len(chunk)
                await response.write(chunk)
            await response.write_eof()
            return response


def describe(proxy: ChaosProxy) -> str:
    """One line for a test's output: what the proxy did."""
    return json.dumps(
        {
            "faults": dict(proxy.fault_codes()),
            "faulted": dict(Counter(f.method for f in proxy.faults)),
            "forwarded": dict(proxy.forwarded),
            "watchBytes": proxy.watch_bytes,
        }
    )
