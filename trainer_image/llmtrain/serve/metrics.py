"""The llmserve_* Prometheus series of one serving process, on its own registry."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llmtrain.energy import EnergyReader

# Per-request latency on CPU and GPU spans milliseconds (a short completion) to a minute.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW_SECONDS = 10.0
# RAPL package counters wrap after minutes at full power; reading them between scrapes too keeps one
# wrap from being missed when nothing scrapes for a while (NVML's counter is 64-bit and never wraps).
ENERGY_POLL_SECONDS = 30.0


class TokenRate:
    """Generated tokens per second over the last RATE_WINDOW_SECONDS (0 when idle)."""

    def __init__(self, window: float = RATE_WINDOW_SECONDS) -> None:
        self.window = window
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()  # read by the scrape, written by the event loop

    def add(self, tokens: int, now: float | None = None) -> None:
        with self._lock:
            self._events.append((time.monotonic() if now is None else now, tokens))

    def rate(self, now: float | None = None) -> float:
        t = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0][0] < t - self.window:
                self._events.popleft()
            return sum(n for _, n in self._events) / self.window


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmserve_requests",
            "HTTP requests answered, by route and status code",
            ["route", "code"],
            registry=r,
        )
        self.errors = Counter(
            "llmserve_request_errors",
            "Requests answered with an error, by OpenAI error type (invalid_request_error, server_error, ...)",
            ["type"],
            registry=r,
        )
        self.latency = Histogram(
            "llmserve_request_duration_seconds",
            "Time from request received to the last byte written, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "llmserve_time_to_first_token_seconds",
            "Time from a sequence entering the queue to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("llmserve_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("llmserve_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.token_rate = TokenRate()
        Gauge(
            "llmserve_tokens_per_second",
            f"Generated tokens/s over the last {RATE_WINDOW_SECONDS:g} s",
            registry=r,
        ).set_function(self.token_rate.rate)
        self.batch_size = Histogram(
            "llmserve_batch_size",
            "Sequences per forward pass: phase=prefill (new prompts) or decode (one token per running sequence)",
            ["phase"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "llmserve_queue_depth", "Sequences waiting for a place in the running batch", registry=r
        )
        self.running = Gauge("llmserve_running_sequences", "Sequences in the running batch", registry=r)
        self.ready = Gauge(
            "llmserve_ready", "1 once the model is loaded and warmed up, 0 otherwise", registry=r
        )

        self.energy_available = Gauge(
            "llmserve_energy_available",
            "1 when the serving device's energy is measured (NVML on its GPU, RAPL on the CPU), else 0:"
            " the energy series are then absent, never estimated",
            registry=r,
        )
        self.energy: EnergyReader | None = None
        self._generated = 0

    def tokens_generated(self, n: int) -> None:
        self.generated_tokens.inc(n)
        self.token_rate.add(n)
        self._generated += n

    def measure_energy(self, reader: EnergyReader | None) -> None:
        """Count the serving device's energy from now on (the model is loaded), or say it cannot be.

        The figure is everything the device drew while serving, idle time included: what the served
        tokens cost. RAPL counts the whole CPU package, other tenants' work too.
        """
        self.energy = reader
        self.energy_available.set(0 if reader is None else 1)
        if reader is None:
            return
        reader.start()
        r = self.registry
        Gauge(
            "llmserve_energy_joules",
            f"Energy of the serving device since the model was loaded ({reader.source})",
            registry=r,
        ).set_function(reader.joules)
        Gauge(
            "llmserve_energy_joules_per_generated_token",
            "llmserve_energy_joules over the tokens generated so far (NaN before the first)",
            registry=r,
        ).set_function(self.joules_per_token)

    def joules_per_token(self) -> float:
        if self.energy is None or self._generated == 0:
            return float("nan")
        return self.energy.joules() / self._generated

    def energy_summary(self) -> dict[str, float | int | str | None]:
        if self.energy is None:
            return {"energy_measured": False}
        joules = self.energy.joules()
        return {
            "energy_measured": True,
            "source": self.energy.source,
            "joules": round(joules, 3),
            "generated_tokens": self._generated,
            "joules_per_token": joules / self._generated if self._generated else None,
        }

    async def poll_energy(self, period: float = ENERGY_POLL_SECONDS) -> None:
        """Read the counter every ``period`` on the event loop (where scrapes read it too, so the
        reader needs no lock)."""
        while self.energy is not None:
            await asyncio.sleep(period)
            self.energy.joules()
