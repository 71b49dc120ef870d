"""The scheduler: a queue of sequences, admitted into the running batch between decode steps.

Each iteration (one asyncio task, so no locks) drops the sequences that finished, admits waiting ones
up to ``max_batch_size`` rows, and runs one model step on the model thread: a decode step for the
rows already running plus one prefill pass for the newcomers, then one sampled token per row. A
request therefore waits at most one decode step for a free row, not for a whole batch to finish,
and a long completion never holds short ones back. Tokens go to the request's queue as text deltas, with the log-probabilities of their tokens when a request asks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence as Seq
from collections.abc import Set
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from llmtrain.logs import Logger
from llmtrain.serve.batch import RunningBatch
from llmtrain.serve.errors import ApiError
from llmtrain.serve.logprobs import TokenLogprob
from llmtrain.serve.metrics import ServingMetrics
from llmtrain.serve.protocol import SamplingParams
from llmtrain.serve.sampling import adjust_logits, new_generator, sample_row
from llmtrain.serve.score import entries, log_softmax, score_prompts
from llmtrain.serve.text import Delta, TextAssembler


@dataclass(eq=False)
class Sequence:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: asyncio.Queue[Delta]
    text: TextAssembler
    generator: torch.Generator
    enqueued: float = field(default_factory=time.monotonic)
    tokens: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    """How often each token id was sampled so far (for presence and frequency penalties)."""
    unsent: list[TokenLogprob] = field(default_factory=list)
    """Log-probability entries of tokens whose text is still held back."""
    finished: bool = False
    cancelled: bool = False
    """Set by the HTTP side when the client went away; the row is dropped at the next step."""


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        eos_ids: Set[int],
        pad_id: int,
        max_batch_size: int,
        metrics: ServingMetrics,
        executor: Executor,
        max_waiting: int | None = None,
        log: Logger | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting if max_waiting is not None else 32 * max_batch_size
        self.metrics = metrics
        self.log = log or Logger(rank=0)
        self._model = model
        self._pad_id = pad_id
        self._executor = executor
        self._batch = RunningBatch(model, pad_id)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._pending: list[int] = []  # each running row's last sampled token, not yet fed to the model
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.vocab_size = _vocab_size(model, tokenizer)
        """Token ids a request may name (prompt ids, logit_bias keys) lie in [0, vocab_size)."""

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """``special=False`` for a rendered chat template: it already holds the special tokens it wants."""
        ids: list[int] = (
            self.tokenizer.encode(text) if special else self.tokenizer.encode(text, add_special_tokens=False)
        )
        return ids

    def token_text(self, token_id: int) -> str:
        """A token as logprobs name it: its own text, special tokens included (as vLLM names them)."""
        text: str = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    async def score(self, prompts: list[list[int]], k: int) -> list[list[TokenLogprob | None]]:
        """Each prompt token's log-probability given the tokens before it (echo with logprobs)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, score_prompts, self._model, prompts, k)
        except Exception as exc:  # a failed forward fails this request only
            self.log.event("scoring_failed", error=f"{type(exc).__name__}: {exc}", prompts=len(prompts))
            raise ApiError(
                500, f"scoring the prompt failed: {type(exc).__name__}: {exc}", type_="server_error"
            ) from exc

    def decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> tuple[asyncio.Queue[Delta], list[Sequence]]:
        """Queue one sequence per prompt; their deltas arrive on the returned queue."""
        if len(self._waiting) + len(prompts) > self.max_waiting:
            raise ApiError(
                429,
                f"the server is overloaded ({len(self._waiting)} sequences waiting); retry later",
                code="queue_full",
                type_="server_error",
            )
        sink: asyncio.Queue[Delta] = asyncio.Queue()
        seqs = [
            Sequence(
                i, ids, params, sink, TextAssembler(self.decode, params.stop), new_generator(params.seed, i)
            )
            for i, ids in enumerate(prompts)
        ]
        self._waiting.extend(seqs)
        self.metrics.queue_depth.set(len(self._waiting))
        self._idle.clear()
        self._wake.set()
        return sink, seqs

    async def wait_idle(self, timeout: float) -> bool:
        """True once nothing is waiting or running; False if that took longer than ``timeout``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def warm_up(self) -> None:
        """One short greedy generation through the whole path, so the first user request is not slower."""
        sink, _ = self.submit([[self._pad_id]], SamplingParams(max_tokens=2, temperature=0.0))
        while True:
            delta = await sink.get()
            if delta.error:
                raise RuntimeError(f"warm-up generation failed: {delta.error}")
            if delta.finish_reason:
                return

    async def run(self) -> None:
        """The scheduling loop; runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            while self._waiting and self._waiting[0].cancelled:
                self._waiting.popleft()
            keep = [i for i, s in enumerate(self._running) if not (s.finished or s.cancelled)]
            if not keep and not self._waiting:
                self._running, self._pending = [], []
                self._batch.keep([])
                self._publish_load()
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            rows = [self._running[i] for i in keep]
            pending = [self._pending[i] for i in keep]
            admit: list[Sequence] = []
            while self._waiting and len(rows) + len(admit) < self.max_batch_size:
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    admit.append(seq)
            self._running = rows + admit
            self._publish_load()
            if pending:
                self.metrics.batch_size.labels("decode").observe(len(pending))
            if admit:
                self.metrics.batch_size.labels("prefill").observe(len(admit))
                self.metrics.prompt_tokens.inc(sum(len(s.prompt_ids) for s in admit))
            try:
                tokens = await loop.run_in_executor(self._executor, self._step, keep, pending, self._running)
            except Exception as exc:  # a failed forward fails its rows, not the server
                self._fail_running(f"{type(exc).__name__}: {exc}")
                continue
            self._pending = [t for t, _ in tokens]
            now = time.monotonic()
            for seq, (token, entry) in zip(self._running, tokens, strict=True):
                self._deliver(seq, token, entry, now)
            self.metrics.tokens_generated(len(tokens))

    def _publish_load(self) -> None:
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.running.set(len(self._running))

    def _step(
        self, keep: list[int], pending: list[int], rows: list[Sequence]
    ) -> list[tuple[int, TokenLogprob | None]]:
        """On the model thread: drop finished rows, decode the running ones, prefill newcomers, sample.

        Each row's token, with its log-probability entry if its request asked for logprobs.
        """
        self._batch.keep(keep)
        if pending:
            self._batch.advance(pending)
        admitted = rows[len(keep) :]
        if admitted:
            self._batch.add([s.prompt_ids for s in admitted])
        logits = self._batch.logits
        # Plain greedy rows (no penalty, no bias) take one argmax over all of them: per-row torch calls
        # cost more than the arithmetic at small batch sizes, and this runs once per decode step.
        plain = [i for i, s in enumerate(rows) if _plain_greedy(s.params)]
        greedy = dict(zip(plain, logits[plain].argmax(-1).tolist(), strict=True)) if plain else {}
        tokens = [
            greedy[i]
            if i in greedy
            else sample_row(
                adjust_logits(
                    logits[i],
                    s.counts,
                    s.params.frequency_penalty,
                    s.params.presence_penalty,
                    s.params.logit_bias,
                ),
                s.params.temperature,
                s.params.top_p,
                s.generator,
            )
            for i, s in enumerate(rows)
        ]
        return list(zip(tokens, _logprob_entries(logits, tokens, rows), strict=True))

    def _deliver(self, seq: Sequence, token: int, entry: TokenLogprob | None, now: float) -> None:
        if seq.tokens == 0:
            self.metrics.time_to_first_token.observe(now - seq.enqueued)
        seq.tokens += 1
        seq.counts[token] = seq.counts.get(token, 0) + 1
        if entry is not None:
            seq.unsent.append(entry)
        finish: str | None = None
        if token in self.eos_ids:
            text, finish = seq.text.flush(), "stop"
        else:
            text = seq.text.add(token)
            if seq.text.stopped:
                finish = "stop"
            elif seq.tokens >= seq.params.max_tokens:
                text, finish = text + seq.text.flush(), "length"
        seq.finished = finish is not None
        if not seq.cancelled and (text or finish):
            seq.sink.put_nowait(Delta(seq.index, text, finish, seq.tokens, logprobs=tuple(seq.unsent)))
            seq.unsent.clear()

    def _fail_running(self, message: str) -> None:
        self.log.event("generation_failed", error=message, sequences=len(self._running))
        for seq in self._running:
            seq.finished = True
            seq.sink.put_nowait(Delta(seq.index, "", None, seq.tokens, error=message))
        self._running, self._pending = [], []
        self._batch = RunningBatch(self._model, self._pad_id)


def _logprob_entries(
    logits: torch.Tensor, tokens: list[int], rows: Seq[Sequence]
) -> list[TokenLogprob | None]:
    """One log_softmax over the rows that asked for logprobs (raw logits: see logprobs.py), None elsewhere."""
    asked = [i for i, s in enumerate(rows) if s.params.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not asked:
        return out
    index = torch.tensor(asked, dtype=torch.long)
    values = log_softmax(logits[index])
    for i in asked:  # rows may ask for different k
        pos = asked.index(i)
        out[i] = entries(values[pos : pos + 1], [tokens[i]], rows[i].params.logprobs or 0)[0]
    return out


def _vocab_size(model: torch.nn.Module, tokenizer: Any) -> int:
    """The logits' width from the model's config; else the tokenizer's size; else no bound to check."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None and hasattr(tokenizer, "__len__"):
        size = len(tokenizer)
    return int(size) if size else 2**31


def _plain_greedy(params: SamplingParams) -> bool:
    return (
        params.temperature == 0.0
        and params.frequency_penalty == 0.0
        and params.presence_penalty == 0.0
        and not params.logit_bias
    )
