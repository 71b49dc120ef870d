"""Bounded load test of `llmtrain serve` on 127.0.0.1: latency percentiles, throughput, failures.

Starts the server as a child process (`--port 0`), waits for /readyz, then sends --requests
completion requests from --concurrency client tasks (each sends its next request as soon as the
previous one is answered), prompts drawn from the system's licence texts. Without --model-dir it
first trains the debug model (124k parameters, 200 steps) with `llmtrain train`. The server's own view of the
run (forward passes and their batch sizes, time to first token) comes from its /metrics.

Then the same load (same prompts, concurrency, max_tokens, temperature, seeds) goes to a naive
server: a child process that answers /v1/completions one request at a time with one Hugging Face
`model.generate` call each, on the same model loaded the same way and the same torch threads. Both
servers stay up and the load runs --repeats times on each, alternating, so a neighbour's load on a
shared machine hits both sides alike; the fastest run of each is reported. The last line is the ratio
of the two generated-token throughputs.

    python benchmarks/serving.py [--model-dir DIR] [--requests 200] [--concurrency 8] [--max-tokens 32]
                                 [--max-batch-size 8] [--threads N] [--temperature 0] [--repeats 3]

Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

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
    url: str, model: str, texts: list[str], concurrency: int, max_tokens: int, temperature: float
) -> dict[str, Any]:
    todo = list(enumerate(texts))
    result: dict[str, Any] = {"latency": [], "tokens": [], "failed": [], "texts": {}}

    async def client(session: aiohttp.ClientSession) -> None:
        while todo:
            i, text = todo.pop(0)
            body = {
                "model": model,
                "prompt": text,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": i,
            }
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
            result["texts"][i] = answer["choices"][0]["text"]

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)
    ) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return result


def naive_serve(model_dir: str, threads: int, conn: Connection) -> None:
    """The naive server (run in a child process): /v1/completions, one request at a time, each one
    `model.generate` call with batch size 1. Sends its port through ``conn`` once it has warmed up."""
    # SIGTERM ends serve_forever through SystemExit, so the process exits the normal way (no leaked
    # semaphore warnings from its multiprocessing resource tracker after the benchmark's last line).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import torch
    from transformers.utils import logging as hf_logging

    from llmtrain.serve.loader import load as load_served

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    torch.set_num_threads(threads)
    loaded = load_served(model_dir)
    model: Any = loaded.model
    tok, eos = loaded.tokenizer, sorted(loaded.eos_ids)

    def complete(body: dict[str, Any]) -> dict[str, Any]:
        ids = tok.encode(body["prompt"])
        temperature = float(body.get("temperature", 1.0))
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            torch.manual_seed(int(body.get("seed", 0)))
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0}
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=int(body["max_tokens"]),
                eos_token_id=eos,
                pad_token_id=loaded.pad_id,
                **sampling,
            )
        gen = out[0, len(ids) :].tolist()
        return {
            "object": "text_completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "text": tok.decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                    "finish_reason": "stop" if gen and gen[-1] in eos else "length",
                }
            ],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": len(gen),
                "total_tokens": len(ids) + len(gen),
            },
        }

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps(complete(body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(HTTPServer):
        # Requests wait in the kernel's accept queue, not in SYN retries, while one is being answered.
        request_queue_size = 128

    httpd = Server(("127.0.0.1", 0), Handler)
    complete({"model": "warm-up", "prompt": "warm up", "max_tokens": 2, "temperature": 0})
    conn.send(httpd.server_address[1])
    httpd.serve_forever()


class NaiveServer:
    """The naive server as a child process on 127.0.0.1 (spawned: a fresh interpreter, as a server is)."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=naive_serve, args=(str(model_dir), threads, child), daemon=True)
        self.proc.start()
        if not parent.poll(300):
            self.stop()
            raise RuntimeError("the naive server did not start in 300 s")
        self.port = int(parent.recv())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(30)


def timed_load(
    url: str, texts: list[str], concurrency: int, max_tokens: int, temperature: float
) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    r = asyncio.run(load(url, "bench", texts, concurrency, max_tokens, temperature))
    return r, time.perf_counter() - start


def report(name: str, r: dict[str, Any], wall: float, requests: int) -> float:
    """Prints the client-side figures of one run; returns its generated tokens per second."""
    lat = [x * 1000 for x in r["latency"]]
    tokens = sum(r["tokens"])
    print(f"{name}completed {len(lat)}/{requests} in {wall:.1f} s; failed requests: {len(r['failed'])}")
    if lat:
        print(
            f"{name}latency ms: p50 {percentile(lat, 50):.0f}  p90 {percentile(lat, 90):.0f}  "
            f"p99 {percentile(lat, 99):.0f}  max {max(lat):.0f}  (mean {statistics.mean(lat):.0f})"
        )
    print(
        f"{name}throughput: {len(lat) / wall:.1f} requests/s, {tokens / wall:.0f} generated tokens/s "
        f"({tokens} tokens)"
    )
    return float(tokens / wall)


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
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy decoding")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="load runs per server, alternating built-in and naive; the fastest of each is reported",
    )
    args = p.parse_args()
    texts = prompts(args.requests)

    with tempfile.TemporaryDirectory(prefix="llmserve-bench-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            print("training the debug model (no --model-dir) ...", flush=True)
            model_dir = train_debug_model(Path(tmp))
        flags = ["--model-name", "bench", "--max-batch-size", str(args.max_batch_size)]
        srv = ServerProcess(model_dir, *flags, *(["--threads", str(args.threads)] if args.threads else []))
        naive_srv: NaiveServer | None = None
        runs: list[tuple[dict[str, Any], float, dict[str, float], dict[str, float]]] = []
        naive_runs: list[tuple[dict[str, Any], float]] = []
        try:
            srv.wait_ready()
            loaded = srv.wait_event("model_loaded", 1)
            threads = int(loaded["threads"])
            print(
                f"server: 127.0.0.1:{srv.port}, model {model_dir} ({loaded['parameters']} parameters), "
                f"--max-batch-size {args.max_batch_size}, {loaded['threads']} torch threads"
            )
            print(
                f"load: {args.requests} requests, {args.concurrency} concurrent, max_tokens {args.max_tokens}, "
                f"temperature {args.temperature:g}"
            )
            naive_srv = NaiveServer(model_dir, threads)
            print(
                f"naive server: 127.0.0.1:{naive_srv.port}, one model.generate per request, one request at a "
                f"time, {threads} torch threads; {args.repeats} runs each, alternating, fastest reported"
            )
            for _ in range(args.repeats):
                before = scrape(srv)
                r, wall = timed_load(
                    f"http://127.0.0.1:{srv.port}", texts, args.concurrency, args.max_tokens, args.temperature
                )
                runs.append((r, wall, before, scrape(srv)))
                naive_runs.append(
                    timed_load(
                        f"http://127.0.0.1:{naive_srv.port}",
                        texts,
                        args.concurrency,
                        args.max_tokens,
                        args.temperature,
                    )
                )
        finally:
            code = srv.stop()
            if naive_srv is not None:
                naive_srv.stop()

    r, wall, before, after = min(runs, key=lambda run: run[1])
    builtin_rate = report("", r, wall, args.requests)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    decode_passes = delta('llmserve_batch_size_count{phase="decode"}')
    ttft_count = delta("llmserve_time_to_first_token_seconds_count")
    if decode_passes:
        mean_batch = delta('llmserve_batch_size_sum{phase="decode"}') / decode_passes
        print(f"server: {decode_passes:.0f} decode passes, mean {mean_batch:.2f} sequences per pass")
    if ttft_count:
        ttft = delta("llmserve_time_to_first_token_seconds_sum") / ttft_count * 1000
        print(f"server: mean time to first token {ttft:.0f} ms (queueing + prefill)")
    print(f"server exit code after SIGTERM: {code}")
    naive, naive_wall = min(naive_runs, key=lambda run: run[1])
    naive_rate = report("naive: ", naive, naive_wall, args.requests)

    def rates(some: list[Any]) -> str:
        return ", ".join(f"{sum(run[0]['tokens']) / run[1]:.0f}" for run in some)

    print(f"generated tokens/s of every run: built-in [{rates(runs)}], naive [{rates(naive_runs)}]")
    same = sum(1 for i, text in r["texts"].items() if naive["texts"].get(i) == text)
    print(f"identical answers from both servers: {same}/{args.requests} (expected all when greedy)")
    print(f"builtin serving throughput vs naive generate: {builtin_rate / naive_rate:.2f}")
    failed = any(run[0]["failed"] for run in runs) or any(run[0]["failed"] for run in naive_runs)
    return 1 if failed or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
