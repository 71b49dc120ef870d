"""Operator settings, from environment variables (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    namespaces: list[str] = field(default_factory=list)
    """LLMOP_NAMESPACES: comma-separated namespaces to watch; empty watches the whole cluster."""
    bind_address: str = ""
    """LLMOP_BIND_ADDRESS: address for the metrics and health servers; empty means every interface."""
    metrics_port: int = 8080
    """LLMOP_METRICS_PORT: Prometheus metrics."""
    health_port: int = 8081
    """LLMOP_HEALTH_PORT: liveness/readiness (/healthz) served by Kopf."""
    log_format: str = "plain"
    """LLMOP_LOG_FORMAT: plain, full or json."""
    progress_interval_seconds: float = 10.0
    """LLMOP_PROGRESS_INTERVAL: minimum seconds between two scrapes of one job's rank-0 metrics."""
    resync_seconds: float = 30.0
    """LLMOP_RESYNC_SECONDS: a job is reconciled at least this often even without events."""

    @classmethod
    def from_env(cls) -> Settings:
        namespaces = [n.strip() for n in _env("LLMOP_NAMESPACES", "").split(",") if n.strip()]
        return cls(
            namespaces=namespaces,
            bind_address=_env("LLMOP_BIND_ADDRESS", ""),
            metrics_port=int(_env("LLMOP_METRICS_PORT", "8080")),
            health_port=int(_env("LLMOP_HEALTH_PORT", "8081")),
            log_format=_env("LLMOP_LOG_FORMAT", "plain"),
            progress_interval_seconds=float(_env("LLMOP_PROGRESS_INTERVAL", "10")),
            resync_seconds=float(_env("LLMOP_RESYNC_SECONDS", "30")),
        )
