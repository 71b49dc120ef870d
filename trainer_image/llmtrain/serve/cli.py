"""``llmtrain serve``: an OpenAI-compatible completions server for one model directory.

    llmtrain serve --model-dir DIR [--host 127.0.0.1] [--port 8000] [--max-batch-size 8]
                   [--model-name NAME] [--max-tokens-limit 512] [--threads N] [--drain-timeout 25]
                   [--device auto|cpu|cuda]

The port opens at once: /healthz answers while the model loads, /readyz and /v1/completions answer
503 until the model is loaded and one warm-up generation has run. SIGTERM (or SIGINT) starts a
drain: /readyz and new completions answer 503, running and queued sequences finish, then the
process exits 0. Exit 1 when the model cannot be loaded; exit 2 (before listening) when the directory
is not a model or ``--device`` cannot run it (``cuda`` without a GPU, or the CPU-only quantized layout).

``--device auto`` (the default) serves on CUDA when torch sees a GPU and on the CPU otherwise, in the
checkpoint's own dtype (llmtrain.compress.device); the quantized layout always serves on the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from llmtrain.compress.device import DEVICE_CHOICES, DEVICE_HELP
from llmtrain.logs import Logger
from llmtrain.serve.app import ServerState, build_app
from llmtrain.serve.cpus import available_cpus
from llmtrain.serve.metrics import ServingMetrics

if TYPE_CHECKING:
    import torch

DEFAULT_DRAIN_SECONDS = 25.0  # under Kubernetes' default 30 s terminationGracePeriodSeconds
# For tests: when set, the model is not loaded (nor torch imported) until this file exists, so the
# loading state lasts until the test ends it; a small model otherwise loads before a request arrives.
HOLD_LOAD_ENV = "LLMTRAIN_SERVE_HOLD_LOAD_UNTIL"


def default_model_name(model_dir: str) -> str:
    """The directory's own name: the trained export's job directory or the compression stage."""
    return Path(model_dir).resolve().name


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmtrain serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="model directory (trained export or compressed stage)")
    p.add_argument(
        "--host",
        action="append",
        help="address to listen on (default 127.0.0.1); repeat to listen on several, e.g. the pod IP and loopback",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one and logs it)")
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--model-name", help="the `model` clients send (default: the directory's name)")
    p.add_argument(
        "--max-tokens-limit", type=int, default=512, help="largest max_tokens a request may ask for"
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: the CPUs the container may use, cgroup quota included, minus one)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_SECONDS,
        help="seconds SIGTERM waits for running requests before exiting",
    )
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help=DEVICE_HELP)
    args = p.parse_args(argv)
    if min(args.max_batch_size, args.max_tokens_limit, args.threads or 1) < 1 or not 0 <= args.port <= 65535:
        p.error("--max-batch-size, --max-tokens-limit and --threads must be >= 1, --port in [0, 65535]")
    args.host = args.host or ["127.0.0.1"]
    # One CPU stays with the event loop (HTTP, JSON, detokenising); the rest run the forward passes.
    args.threads = args.threads or max(1, available_cpus() - 1)
    args.model_name = args.model_name or default_model_name(args.model_dir)
    return args


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


async def _start_engine(
    state: ServerState, args: argparse.Namespace, executor: ThreadPoolExecutor
) -> asyncio.Task[None]:
    """Load (on the model thread), start the scheduler, warm up, then report ready."""
    gate = os.environ.get(HOLD_LOAD_ENV)
    if gate:
        state.log.event("load_held", until=gate)
        while not os.path.exists(gate):
            await asyncio.sleep(0.02)
    from llmtrain.serve.batch import model_device, spliceable
    from llmtrain.serve.engine import Engine
    from llmtrain.serve.loader import load

    loaded = await asyncio.get_running_loop().run_in_executor(executor, load, args.model_dir, args.device)
    state.log.event(
        "model_loaded",
        model_dir=args.model_dir,
        parameters=loaded.parameters,
        context_length=loaded.context_length,
        threads=args.threads,
        seconds=loaded.seconds,
        device=str(model_device(loaded.model)),
        dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        # False: this architecture decodes one forward pass per row (serve/batch.py says which and why)
        continuous_batching=spliceable(loaded.model),
    )
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        eos_ids=loaded.eos_ids,
        pad_id=loaded.pad_id,
        max_batch_size=args.max_batch_size,
        metrics=state.metrics,
        executor=executor,
        log=state.log,
    )
    task = asyncio.create_task(engine.run(), name="llmserve-engine")
    _measure_energy(state, model_device(loaded.model))
    start = time.monotonic()
    await engine.warm_up()
    state.context_length = loaded.context_length
    state.engine = engine
    state.metrics.ready.set(1)
    state.log.event("ready", model=state.model_name, warmup_seconds=time.monotonic() - start)
    return task


def _measure_energy(state: ServerState, device: torch.device) -> None:
    from llmtrain import energy

    reader = energy.discover([device.index or 0] if device.type == "cuda" else None)
    state.metrics.measure_energy(reader)
    state.log.event("energy", measured=reader is not None, source=reader.source if reader else None)
    if reader is not None:
        state.energy_poll = asyncio.create_task(state.metrics.poll_energy(), name="llmserve-energy")


async def _drain(state: ServerState, deadline: float) -> bool:
    """Wait until every accepted request is answered; False if the deadline came first."""
    if state.engine is not None and not await state.engine.wait_idle(max(deadline - time.monotonic(), 0)):
        return False
    while state.inflight and time.monotonic() < deadline:  # last bytes of answers already generated
        await asyncio.sleep(0.01)
    return state.inflight == 0


async def serve(args: argparse.Namespace) -> int:
    log = Logger(rank=0)
    state = ServerState(
        model_name=args.model_name, max_tokens_limit=args.max_tokens_limit, metrics=ServingMetrics(), log=log
    )
    runner = web.AppRunner(build_app(state), access_log=None, handle_signals=False)
    await runner.setup()
    for host in args.host:
        await web.TCPSite(runner, host, args.port, shutdown_timeout=1.0).start()
    for address in runner.addresses:
        log.event("listening", host=address[0], port=address[1], model=args.model_name)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # One model thread: every forward pass runs there, one at a time, with its own torch thread count.
    executor = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="llmserve-model", initializer=_set_threads, initargs=(args.threads,)
    )
    startup = asyncio.create_task(_start_engine(state, args, executor))
    stopping = asyncio.create_task(stop.wait())
    code = 0
    await asyncio.wait({startup, stopping}, return_when=asyncio.FIRST_COMPLETED)
    engine_task: asyncio.Task[None] | None = None
    if startup.done() and startup.exception() is not None:
        log.event("model_load_failed", model_dir=args.model_dir, error=repr(startup.exception()))
        code = 1
    elif startup.done():
        engine_task = startup.result()
        await asyncio.wait({engine_task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if engine_task.done():  # the scheduler never ends by itself: this is a bug, let Kubernetes restart
            log.event("engine_failed", error=repr(engine_task.exception()))
            code = 1

    state.draining = True
    state.metrics.ready.set(0)
    if code == 0 and state.engine is not None:
        log.event(
            "draining", running=state.engine.running, waiting=state.engine.waiting, requests=state.inflight
        )
        drained = await _drain(state, time.monotonic() + args.drain_timeout)
        log.event("drained" if drained else "drain_timeout", requests=state.inflight)
    await runner.cleanup()
    log.event("served", **state.metrics.energy_summary())
    for task in (startup, stopping, engine_task, state.energy_poll):
        if task is not None:
            task.cancel()
    executor.shutdown(wait=False, cancel_futures=True)
    log.event("stopped", exit_code=code)
    return code


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from llmtrain.config import DataError
    from llmtrain.exits import refuse

    # Before listening: a missing directory is the user's to fix (exit 2), not a crash to restart.
    if not (Path(args.model_dir) / "config.json").is_file():
        missing = DataError(f"--model-dir {args.model_dir} is not a model directory (no config.json)")
        return refuse("llmtrain serve", missing, "serve")
    if args.device == "cuda":  # only cuda can be refused; auto and cpu open the port before torch loads
        from llmtrain.compress.device import DeviceError
        from llmtrain.compress.load import model_device_for

        try:
            model_device_for(args.model_dir, args.device)
        except DeviceError as exc:
            return refuse("llmtrain serve", exc, "serve")
    return asyncio.run(serve(args))
