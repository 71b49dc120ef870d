"""Bounded load test of `llmtrain serve` on 127.0.0.1: latency percentiles, throughput, failures.

Starts the server as a child process (`--port 0`), waits for /readyz, then sends --requests
completion requests from --concurrency client tasks (each sends its next request as soon as the
previous one is answered), prompts drawn from the system's licence texts. Without --model-dir it
first trains the debug model (124k parameters, 200 steps) with `llmtrain train`. The server's own view of the
run (forward passes and their batch sizes, time to first token) comes from its /metrics.

    python benchmarks/serving.py [--model-dir DIR] [--requests 200] [--concurrency 8] [--max-tokens 32]
                                 [--max-batch-size 8] [--threads N]

Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from llmtrain.serve.process import ServerProcess
from llmtrain.testing import debug_config, license_documents, write_shards


def train_debug_model(work: Path, steps: int = 200) -> Path:
    """`llmtrain train` of configs/debug.yaml (124k parameters) with 128 positions; returns the export."""
    data = write_shards(work / "data", license_documents()[:300])
    config = debug_config(work, data, {"model": {"contextLength": 128}, "training": {"maxSteps": steps}})
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "NNODES", "NPROC_PER_NODE")}
    env.update(DS_ACCELERATOR="cpu", LLMOP_METRICS_PORT="0")
    subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "train", str(config)], env=env, check=True, capture_output=True
    )
    return work / "output" / "model"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts of 3 to 12 words from real prose."""
    words = " ".join(license_documents()).split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, length = rng.randrange(len(words) - 12), rng.randint(3, 12)
        out.append(" ".join(words[start : start + length]))
    return out


async def load(
    url: str, model: str, texts: list[str], concurrency: int, max_tokens: int
) -> dict[str, list[float]]:
    todo = list(enumerate(texts))
    result: dict[str, list[float]] = {"latency": [], "tokens": [], "failed": []}

    async def client(session: aiohttp.ClientSession) -> None:
        while todo:
            i, text = todo.pop(0)
            body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0.8, "seed": i}
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/completions", json=body) as response:
                    answer = await response.json()
                    ok = response.status == 200
            except aiohttp.ClientError as exc:
                answer, ok = {"error": str(exc)}, False
            if not ok:
                result["failed"].append(i)
                print(f"request {i} failed: {answer}", file=sys.stderr)
                continue
            result["latency"].append(time.perf_counter() - start)
            result["tokens"].append(answer["usage"]["completion_tokens"])

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)
    ) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return result


def scrape(srv: ServerProcess) -> dict[str, float]:
    _, _, data = srv.request("GET", "/metrics")
    values: dict[str, float] = {}
    for line in data.decode().splitlines():
        m = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if m:
            values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return values


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="the server's torch threads (default: its own choice)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmserve-bench-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            print("training the debug model (no --model-dir) ...", flush=True)
            model_dir = train_debug_model(Path(tmp))
        flags = ["--model-name", "bench", "--max-batch-size", str(args.max_batch_size)]
        srv = ServerProcess(model_dir, *flags, *(["--threads", str(args.threads)] if args.threads else []))
        try:
            srv.wait_ready()
            loaded = srv.wait_event("model_loaded", 1)
            print(
                f"server: 127.0.0.1:{srv.port}, model {model_dir} ({loaded['parameters']} parameters), "
                f"--max-batch-size {args.max_batch_size}, {loaded['threads']} torch threads"
            )
            print(
                f"load: {args.requests} requests, {args.concurrency} concurrent, max_tokens {args.max_tokens}, "
                "temperature 0.8"
            )
            before = scrape(srv)
            start = time.perf_counter()
            r = asyncio.run(
                load(
                    f"http://127.0.0.1:{srv.port}",
                    "bench",
                    prompts(args.requests),
                    args.concurrency,
                    args.max_tokens,
                )
            )
            wall = time.perf_counter() - start
            after = scrape(srv)
        finally:
            code = srv.stop()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    lat = [x * 1000 for x in r["latency"]]
    tokens = sum(r["tokens"])
    decode_passes = delta('llmserve_batch_size_count{phase="decode"}')
    ttft_count = delta("llmserve_time_to_first_token_seconds_count")
    print(f"completed {len(lat)}/{args.requests} in {wall:.1f} s; failed requests: {len(r['failed'])}")
    if lat:
        print(
            f"latency ms: p50 {percentile(lat, 50):.0f}  p90 {percentile(lat, 90):.0f}  "
            f"p99 {percentile(lat, 99):.0f}  max {max(lat):.0f}  (mean {statistics.mean(lat):.0f})"
        )
    print(
        f"throughput: {len(lat) / wall:.1f} requests/s, {tokens / wall:.0f} generated tokens/s ({tokens} tokens)"
    )
    if decode_passes:
        mean_batch = delta('llmserve_batch_size_sum{phase="decode"}') / decode_passes
        print(f"server: {decode_passes:.0f} decode passes, mean {mean_batch:.2f} sequences per pass")
    if ttft_count:
        ttft = delta("llmserve_time_to_first_token_seconds_sum") / ttft_count * 1000
        print(f"server: mean time to first token {ttft:.0f} ms (queueing + prefill)")
    print(f"server exit code after SIGTERM: {code}")
    return 1 if r["failed"] or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
