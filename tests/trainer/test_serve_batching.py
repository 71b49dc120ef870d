"""The serving engine's parts without a server: continuous batching, sampling, streamed text, threads."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from llmtrain.serve.batch import RunningBatch
from llmtrain.serve.cpus import available_cpus
from llmtrain.serve.sampling import adjust_logits, new_generator, sample_row
from llmtrain.serve.text import TextAssembler


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    m: torch.nn.Module = LlamaForCausalLM(config)
    m.eval()
    return m


def greedy_alone(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' generate() on one unpadded prompt: the reference for every batched row."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0
    )  # type: ignore[operator]
    return [int(t) for t in out[0, len(prompt) :]]


def test_rows_joining_and_leaving_mid_generation_decode_as_if_alone(model: torch.nn.Module) -> None:
    prompts = {"a": [5, 6, 7], "b": [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], "c": [42], "d": [3, 1, 4, 1, 5]}
    # step at which each prompt joins (c and d in one left-padded prefill), and how many tokens it generates
    joins = {"a": 0, "b": 4, "c": 7, "d": 7}
    lengths = {"a": 9, "b": 14, "c": 12, "d": 6}
    batch = RunningBatch(model, pad_id=0)
    rows: list[str] = []
    got: dict[str, list[int]] = {name: [] for name in prompts}
    pending: list[int] = []
    for step in range(40):
        # Leave: rows that have all their tokens (their last token is never fed back).
        keep = [i for i, name in enumerate(rows) if len(got[name]) < lengths[name]]
        batch.keep(keep)
        pending, rows = [pending[i] for i in keep], [rows[i] for i in keep]
        if pending:
            batch.advance(pending)
        new = [name for name, at in joins.items() if at == step]
        if new:
            batch.add([prompts[name] for name in new])
            rows += new
        if not rows and step > max(joins.values()):
            break
        pending = [int(t) for t in batch.logits.argmax(-1)]
        for name, token in zip(rows, pending, strict=True):
            got[name].append(token)
        # Columns never exceed what the longest remaining row needs (finished rows' padding is trimmed).
        assert batch.columns == int(batch.lengths.max())
    for name, prompt in prompts.items():
        assert got[name] == greedy_alone(model, prompt, lengths[name]), name
    batch.keep([])
    assert batch.rows == 0 and batch.columns == 0


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    gen = new_generator(0)
    assert {sample_row(logits, 1.0, 0.5, gen) for _ in range(200)} == {0}
    assert {sample_row(logits, 1.0, 0.8, gen) for _ in range(400)} == {0, 1}
    assert {sample_row(logits, 1.0, 1.0, gen) for _ in range(400)} == {0, 1, 2}
    assert sample_row(torch.tensor([0.0, 3.0, 1.0]), 0.0, 1.0, gen) == 1  # temperature 0 is argmax


def test_penalties_follow_openais_formula_then_logit_bias_and_leave_the_row_alone() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5, -1.0])
    counts = {1: 3, 2: 1}  # token 1 sampled three times, token 2 once
    out = adjust_logits(logits, counts, frequency_penalty=0.5, presence_penalty=0.25, bias=((4, 2.0),))
    expected = logits.clone()
    for token, count in counts.items():
        expected[token] -= count * 0.5 + 0.25
    expected[4] += 2.0
    assert torch.equal(out, expected)
    assert logits.tolist() == [1.0, 2.0, 3.0, 0.5, -1.0], "the batch's logits (and so logprobs) stay raw"
    assert adjust_logits(logits, {}, 2.0, 2.0) is logits, "nothing generated yet: nothing to penalise"


def test_same_seed_same_samples_and_prompts_of_one_request_differ() -> None:
    logits = torch.zeros(50)
    draws = [[sample_row(logits, 1.0, 1.0, new_generator(7, i)) for _ in range(20)] for i in (0, 0, 1)]
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]


def byte_decoder(pieces: dict[int, bytes]) -> TextAssembler:
    return TextAssembler(lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace"))


def test_text_is_released_only_once_final() -> None:
    euro = "€".encode()  # three bytes, split over two tokens as byte-level BPE can do
    text = byte_decoder({1: b"price ", 2: euro[:2], 3: euro[2:] + b"5"})
    assert [text.add(1), text.add(2), text.add(3)] == ["price ", "", "€5"]


def test_stop_sequence_split_over_tokens_is_never_sent() -> None:
    pieces = {1: "Hello", 2: " wo", 3: "rld!", 4: " bye"}
    text = TextAssembler(lambda ids: "".join(pieces[i] for i in ids), stop=("world", "wait"))
    deltas = [text.add(1), text.add(2)]
    assert deltas == ["Hello", " "]  # "wo" could start "world": held back
    assert text.add(3) == "" and text.stopped
    assert text.text == "Hello "


def test_held_back_text_is_flushed_when_generation_ends() -> None:
    pieces = {1: "a", 2: " w"}
    text = TextAssembler(lambda ids: "".join(pieces[i] for i in ids), stop=("world",))
    assert text.add(1) + text.add(2) == "a "
    assert text.flush() == "w" and not text.stopped


@pytest.mark.parametrize(
    ("files", "affinity", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, 8, 8),  # cgroup v2, no limit: the affinity mask decides
        ({"cpu.max": "150000 100000\n"}, 8, 2),  # 1.5 CPUs round up
        ({"cpu.max": "150000 100000\n"}, 1, 1),  # a quota above the affinity mask changes nothing
        ({"cpu.max": "20000 100000\n"}, 8, 1),  # a fifth of a CPU is still one thread
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8, 3),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8, 8),
        ({}, 8, 8),  # no cgroup files at all
    ],
)
def test_threads_follow_the_containers_cpu_quota(
    files: dict[str, str], affinity: int, expected: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The affinity mask is the test's, not the machine's: on a 2-core machine a cap of 2 would
    # otherwise be indistinguishable from no cap.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert available_cpus(tmp_path) == expected


class CharTokenizer:
    """One token per character (ids = code points): enough to drive the engine without a tokenizer file."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 97 for c in text]

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


class Poisoned(torch.nn.Module):
    """The model, except that prefilling a prompt with token 13 raises (a stand-in for an OOM)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> object:
        if input_ids.shape[1] > 1 and bool((input_ids == 13).any()):
            raise RuntimeError("simulated out of memory")
        return self.model(input_ids=input_ids, **kwargs)


def test_a_failed_forward_fails_its_rows_and_the_engine_carries_on(model: torch.nn.Module) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from llmtrain.logs import Logger
    from llmtrain.serve.engine import Engine
    from llmtrain.serve.errors import ApiError
    from llmtrain.serve.metrics import ServingMetrics
    from llmtrain.serve.protocol import SamplingParams

    async def scenario() -> None:
        engine = Engine(
            Poisoned(model),
            CharTokenizer(),
            eos_ids={1000},  # never sampled (97 tokens): every sequence runs to max_tokens
            pad_id=0,
            max_batch_size=4,
            metrics=ServingMetrics(),
            executor=ThreadPoolExecutor(1),
            max_waiting=2,
            log=Logger(rank=0),
        )
        task = asyncio.create_task(engine.run())
        greedy = SamplingParams(max_tokens=5, temperature=0.0)
        bad, _ = engine.submit([[13, 14]], greedy)
        assert (await bad.get()).error == "RuntimeError: simulated out of memory"
        good, _ = engine.submit([[20, 21, 22]], greedy)
        deltas = [await good.get() for _ in range(5)]
        assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 5
        # Admission is bounded: a request that would overfill the waiting queue is refused with 429.
        with pytest.raises(ApiError) as refused:
            engine.submit([[1], [2], [3]], greedy)
        assert refused.value.status == 429 and refused.value.code == "queue_full"
        task.cancel()

    asyncio.run(scenario())
