"""Chat completions, n, logprobs, echo scoring, penalties and logit_bias of the built-in server.

The server runs in this process (aiohttp on 127.0.0.1, its engine on its own model thread) over a
tiny random Llama whose tokenizer carries a ChatML template (llmtrain.testing_hf), and the test
talks HTTP to it (http.client). Every expected value comes from the same weights run here by full
forward passes (no KV cache, no batching): greedy continuations, log_softmax rows, OpenAI's penalty
formula. Log-probabilities agree within LOGPROB_TOL: the server's cached, padded decode differs from
a full forward by float rounding only (about 1e-6 here), while a real mistake (wrong position, a
penalty or temperature leaking into logprobs) moves a value by far more.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtrain.testing_hf import checkpoint

MODEL = "tiny-chat"
LOGPROB_TOL = 1e-4
MESSAGES = [
    {"role": "system", "content": "You answer in licence prose."},
    {"role": "user", "content": "What does the licence grant?"},
]
PROMPT = "Permission is hereby granted"


@dataclass
class Response:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class Served:
    """The app and engine on a background event loop; ``post`` talks to it over loopback."""

    def __init__(self, model: Any, tokenizer: Any, eos: set[int]) -> None:
        self.model, self.tokenizer, self.eos = model, tokenizer, eos
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(120)
        self.port = port

    async def _start(self) -> int:
        from aiohttp import web

        from llmtrain.serve.app import ServerState, build_app
        from llmtrain.serve.engine import Engine
        from llmtrain.serve.metrics import ServingMetrics

        metrics = ServingMetrics()
        self.state = ServerState(model_name=MODEL, max_tokens_limit=64, metrics=metrics)
        self.engine = Engine(
            self.model,
            self.tokenizer,
            eos_ids=self.eos,
            pad_id=int(self.tokenizer.pad_token_id),
            max_batch_size=4,
            metrics=metrics,
            executor=ThreadPoolExecutor(1),
        )
        self.task = asyncio.create_task(self.engine.run())
        self.state.engine, self.state.context_length = (
            self.engine,
            int(self.model.config.max_position_embeddings),
        )
        self.runner = web.AppRunner(build_app(self.state))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return int(self.runner.addresses[0][1])

    async def _stop(self) -> None:
        self.task.cancel()
        await self.runner.cleanup()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def post(self, path: str, **body: Any) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            payload = json.dumps({"model": MODEL, **body})
            conn.request("POST", path, payload, {"Content-Type": "application/json"})
            answer = conn.getresponse()
            headers = {k.lower(): v for k, v in answer.getheaders()}
            return Response(answer.status, headers, answer.read().decode())
        finally:
            conn.close()

    def ok(self, path: str, **body: Any) -> dict[str, Any]:
        response = self.post(path, **body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def stream(self, path: str, **body: Any) -> list[dict[str, Any]]:
        """The chunks of a streamed answer (which must end with [DONE])."""
        response = self.post(path, stream=True, **body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [b.removeprefix("data: ") for b in response.text.split("\n\n") if b.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    # --- the reference: the same weights, full forward passes in this process ---

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text

    def name(self, token_id: int) -> str:
        text: str = self.tokenizer.decode([token_id])
        return text

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode(text)

    def log_softmax(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)

    def greedy(
        self, prompt: list[int], max_tokens: int, frequency: float = 0.0, presence: float = 0.0
    ) -> list[int]:
        """Greedy decoding with OpenAI's penalties: logit[t] -= count(t) * frequency + (count > 0) * presence."""
        gen: list[int] = []
        for _ in range(max_tokens):
            with torch.no_grad():
                logits = self.model(torch.tensor([prompt + gen])).logits[0, -1].float()
            for t in set(gen):
                logits[t] -= gen.count(t) * frequency + presence
            gen.append(int(logits.argmax()))
            if gen[-1] in self.eos:
                break
        return gen


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir: Path = checkpoint("llama", tmp_path_factory.mktemp("chat") / "tiny-chat")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template, "the fixture's tokenizer has a (ChatML) chat template"
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    served = Served(model, tokenizer, {int(tokenizer.eos_token_id)})
    yield served
    served.close()


def finish(srv: Served, gen: list[int]) -> str:
    return "stop" if gen[-1] in srv.eos else "length"


def test_chat_answers_with_the_templates_greedy_continuation(srv: Served) -> None:
    answer = srv.ok("/v1/chat/completions", messages=MESSAGES, max_tokens=12, temperature=0)
    prompt = srv.chat_prompt(MESSAGES)
    want = srv.greedy(prompt, 12)
    choice = answer["choices"][0]
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["model"] == MODEL
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == srv.decode(want)
    assert choice["finish_reason"] == finish(srv, want) and choice["logprobs"] is None
    assert answer["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(want),
        "total_tokens": len(prompt) + len(want),
    }


def test_chat_stream_sends_role_first_then_the_same_content_and_usage(srv: Served) -> None:
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    whole = srv.ok("/v1/chat/completions", **body)
    chunks = srv.stream("/v1/chat/completions", stream_options={"include_usage": True}, **body)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    with_choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert with_choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert (
        "".join(c["delta"].get("content", "") for c in with_choices)
        == whole["choices"][0]["message"]["content"]
    )
    assert [c["finish_reason"] for c in with_choices][-1] == whole["choices"][0]["finish_reason"]
    assert all(c["finish_reason"] is None for c in with_choices[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_chat_without_a_template_is_refused_not_guessed(srv: Served) -> None:
    template, srv.tokenizer.chat_template = srv.tokenizer.chat_template, None
    try:
        response = srv.post("/v1/chat/completions", messages=MESSAGES, max_tokens=4)
    finally:
        srv.tokenizer.chat_template = template
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages"
    assert "no chat template" in error["message"] and error["type"] == "invalid_request_error"


def test_content_parts_are_the_same_as_the_joined_string(srv: Served) -> None:
    parts = [{"type": "text", "text": "What does the"}, {"type": "text", "text": "licence grant?"}]
    as_parts = srv.ok(
        "/v1/chat/completions", messages=[{"role": "user", "content": parts}], max_tokens=6, temperature=0
    )
    as_text = srv.ok(
        "/v1/chat/completions",
        messages=[{"role": "user", "content": "What does the\nlicence grant?"}],
        max_tokens=6,
        temperature=0,
    )
    assert as_parts["choices"][0]["message"] == as_text["choices"][0]["message"]
    assert as_parts["usage"] == as_text["usage"]


def test_n_gives_n_choices_reproducible_with_a_seed(srv: Served) -> None:
    def ask(seed: int) -> list[str]:
        body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "seed": seed, "n": 3}
        answer = srv.ok("/v1/chat/completions", **body)
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
        assert answer["usage"]["prompt_tokens"] == len(srv.chat_prompt(MESSAGES)), "the prompt counts once"
        return [c["message"]["content"] for c in answer["choices"]]

    first = ask(11)
    assert ask(11) == first
    # Three 10-token samples from a near-uniform 512-token distribution coincide with odds ~1e-25.
    assert len(set(first)) == 3
    assert ask(12) != first


def test_completions_n_orders_choices_by_prompt_then_sample(srv: Served) -> None:
    prompts = [PROMPT, "This program is free software"]
    answer = srv.ok("/v1/completions", prompt=prompts, max_tokens=6, temperature=0, n=2)
    greedy = [srv.decode(srv.greedy(srv.encode(p), 6)) for p in prompts]
    assert [(c["index"], c["text"]) for c in answer["choices"]] == [
        (0, greedy[0]),
        (1, greedy[0]),
        (2, greedy[1]),
        (3, greedy[1]),
    ]
    assert answer["usage"]["prompt_tokens"] == sum(len(srv.encode(p)) for p in prompts)


def test_completion_logprobs_are_the_models_log_softmax(srv: Served) -> None:
    prompt = srv.encode(PROMPT)
    answer = srv.ok("/v1/completions", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    gen = srv.greedy(prompt, 8)
    rows = srv.log_softmax(prompt + gen)[len(prompt) - 1 : -1]
    lp = answer["choices"][0]["logprobs"]
    assert lp["tokens"] == [srv.name(t) for t in gen]
    for value, top, token, row in zip(lp["token_logprobs"], lp["top_logprobs"], gen, rows, strict=True):
        assert abs(value - float(row[token])) <= LOGPROB_TOL
        values, ids = row.topk(3)
        want = {srv.name(int(i)): float(v) for v, i in zip(values, ids, strict=True)}
        assert top.keys() == want.keys()
        assert max(abs(top[k] - want[k]) for k in want) <= LOGPROB_TOL
    # text_offset: each token's start in the returned text, which (no echo) follows the prompt's.
    assert lp["text_offset"][0] == len(PROMPT)
    assert all(
        b - a == len(t)
        for a, b, t in zip(lp["text_offset"][:-1], lp["text_offset"][1:], lp["tokens"][:-1], strict=True)
    )


def test_logprobs_are_the_raw_models_not_the_samplers_and_stream_the_same(srv: Served) -> None:
    # logit_bias forces the tokens (so the test knows them) at temperature 1.5; the logprobs must still
    # be the raw model's log_softmax (vLLM's default), where the forced token is far from certain.
    token = srv.encode(" licence")[0]
    body = {
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 1.5,
        "logprobs": 0,
        "logit_bias": {str(token): 100},
    }
    whole = srv.ok("/v1/completions", **body)["choices"][0]
    prompt = srv.encode(PROMPT)
    rows = srv.log_softmax(prompt + [token] * 4)[len(prompt) - 1 : -1]
    assert whole["logprobs"]["tokens"] == [srv.name(token)] * 4
    want = [float(r[token]) for r in rows]
    assert (
        max(abs(a - b) for a, b in zip(whole["logprobs"]["token_logprobs"], want, strict=True)) <= LOGPROB_TOL
    )
    assert max(want) < -1.0, "the raw model does not expect this token: a biased logprob would be ~0"
    chunks = [c["choices"][0] for c in srv.stream("/v1/completions", **body)]
    streamed = [v for c in chunks if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
    assert streamed == whole["logprobs"]["token_logprobs"]


def test_chat_logprobs_in_the_chat_format(srv: Served) -> None:
    answer = srv.ok(
        "/v1/chat/completions", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    prompt = srv.chat_prompt(MESSAGES)
    gen = srv.greedy(prompt, 8)
    rows = srv.log_softmax(prompt + gen)[len(prompt) - 1 : -1]
    content = answer["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [srv.name(t) for t in gen]
    for item, token, row in zip(content, gen, rows, strict=True):
        assert abs(item["logprob"] - float(row[token])) <= LOGPROB_TOL
        assert item["bytes"] == list(item["token"].encode())
        values, ids = row.topk(2)
        assert [t["token"] for t in item["top_logprobs"]] == [srv.name(int(i)) for i in ids]
        assert (
            max(abs(t["logprob"] - float(v)) for t, v in zip(item["top_logprobs"], values, strict=True))
            <= LOGPROB_TOL
        )


def test_echo_scores_token_id_prompts_like_a_full_forward(srv: Served) -> None:
    """What lm-evaluation-harness's local-completions sends: token ids, echo, logprobs=1, temperature 0."""
    prompts = [srv.encode(PROMPT + " to any person"), srv.encode("THE SOFTWARE IS PROVIDED")]
    answer = srv.ok("/v1/completions", prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert answer["usage"] == {
        "prompt_tokens": sum(map(len, prompts)),
        "completion_tokens": 0,
        "total_tokens": sum(map(len, prompts)),
    }
    for choice, ids in zip(answer["choices"], prompts, strict=True):
        lp = choice["logprobs"]
        rows = srv.log_softmax(ids)
        assert choice["text"] == srv.decode(ids) and choice["finish_reason"] == "length"
        assert lp["tokens"] == [srv.name(t) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for i in range(1, len(ids)):
            assert abs(lp["token_logprobs"][i] - float(rows[i - 1, ids[i]])) <= LOGPROB_TOL
            best = int(rows[i - 1].argmax())
            assert srv.name(best) in lp["top_logprobs"][i] and srv.name(ids[i]) in lp["top_logprobs"][i]
    # With one generated token (newer lm-eval): the prompt's entries, then the sampled token's.
    one = srv.ok("/v1/completions", prompt=prompts[0], max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = one["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompts[0]) + 1
    assert lp["token_logprobs"][:-1] == answer["choices"][0]["logprobs"]["token_logprobs"]
    nxt = int(srv.log_softmax(prompts[0])[-1].argmax())
    assert abs(lp["token_logprobs"][-1] - float(srv.log_softmax(prompts[0])[-1, nxt])) <= LOGPROB_TOL
    assert one["choices"][0]["text"] == srv.decode(prompts[0]) + srv.decode([nxt])


def test_streamed_echo_sends_the_prompt_first_and_the_same_logprobs(srv: Served) -> None:
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 2}
    whole = srv.ok("/v1/completions", **body)["choices"][0]
    chunks = [c["choices"][0] for c in srv.stream("/v1/completions", **body)]
    assert chunks[0]["text"] == PROMPT and chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in chunks if c["logprobs"] for v in c["logprobs"][key]] == whole["logprobs"][key], key
    assert whole["logprobs"]["text_offset"][0] == 0, "under echo, offsets count from the prompt's start"


def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


def test_frequency_penalty_reduces_repeated_tokens(srv: Served) -> None:
    prompt = srv.encode(PROMPT)
    plain = srv.ok("/v1/completions", prompt=PROMPT, max_tokens=32, temperature=0, logprobs=0)
    penalised = srv.ok(
        "/v1/completions", prompt=PROMPT, max_tokens=32, temperature=0, logprobs=0, frequency_penalty=2.0
    )
    plain_ids = srv.greedy(prompt, 32)
    assert plain["choices"][0]["text"] == srv.decode(plain_ids)
    assert repeats(plain_ids) > 0, "the unpenalised greedy text repeats itself (else nothing is measured)"
    want = srv.greedy(prompt, 32, frequency=2.0)
    assert penalised["choices"][0]["text"] == srv.decode(want)
    assert repeats(want) < repeats(plain_ids), (repeats(want), repeats(plain_ids))
    both = srv.ok(
        "/v1/chat/completions",
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        frequency_penalty=0.7,
        presence_penalty=1.1,
    )
    chat_want = srv.greedy(srv.chat_prompt(MESSAGES), 16, frequency=0.7, presence=1.1)
    assert both["choices"][0]["message"]["content"] == srv.decode(chat_want)


def test_logit_bias_forces_a_token(srv: Served) -> None:
    token = srv.encode(" licence")[0]
    answer = srv.ok(
        "/v1/completions", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={str(token): 100}
    )
    assert answer["choices"][0]["text"] == srv.decode([token] * 4)


# (endpoint, body, param, code, words in the message)
REFUSED: list[tuple[str, str, dict[str, Any], str, str | None, str]] = [
    (
        "best_of",
        "/v1/completions",
        {"prompt": "a", "best_of": 2},
        "best_of",
        "unsupported_parameter",
        "best_of",
    ),
    (
        "suffix",
        "/v1/completions",
        {"prompt": "a", "suffix": "end"},
        "suffix",
        "unsupported_parameter",
        "suffix",
    ),
    ("logprobs > 5", "/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs", None, "[0, 5]"),
    ("n = 0", "/v1/completions", {"prompt": "a", "n": 0}, "n", None, "[1, 64]"),
    ("too many choices", "/v1/completions", {"prompt": ["a", "b"], "n": 40}, "n", None, "at most 64"),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 9999]}, "prompt", None, "[0, 512)"),
    (
        "max_tokens 0 without echo",
        "/v1/completions",
        {"prompt": "a", "max_tokens": 0},
        "max_tokens",
        None,
        "echo",
    ),
    (
        "bias out of range",
        "/v1/completions",
        {"prompt": "a", "logit_bias": {"5": 101}},
        "logit_bias",
        None,
        "100",
    ),
    (
        "tools",
        "/v1/chat/completions",
        {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
        "tools",
        "unsupported_parameter",
        "not supported",
    ),
    (
        "json output",
        "/v1/chat/completions",
        {"messages": MESSAGES, "response_format": {"type": "json_object"}},
        "response_format",
        "unsupported_parameter",
        "not supported",
    ),
    (
        "image content",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0].type",
        "unsupported_parameter",
        "only text",
    ),
    (
        "tool role",
        "/v1/chat/completions",
        {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c"}]},
        "messages[0].tool_call_id",
        "unsupported_parameter",
        "not supported",
    ),
    (
        "unknown role",
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "hi"}]},
        "messages[0].role",
        None,
        "one of system, user",
    ),
    ("no messages", "/v1/chat/completions", {"messages": []}, "messages", None, "non-empty"),
    (
        "top_logprobs alone",
        "/v1/chat/completions",
        {"messages": MESSAGES, "top_logprobs": 2},
        "top_logprobs",
        None,
        "requires logprobs",
    ),
    (
        "top_logprobs > 20",
        "/v1/chat/completions",
        {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
        None,
        "[0, 20]",
    ),
    (
        "unknown chat field",
        "/v1/chat/completions",
        {"messages": MESSAGES, "temprature": 0},
        "temprature",
        None,
        "Unrecognized request argument",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "param", "code", "words"), [pytest.param(*c[1:], id=c[0]) for c in REFUSED]
)
def test_unsupported_or_invalid_fields_get_openais_400(
    srv: Served, path: str, body: dict[str, Any], param: str, code: str | None, words: str
) -> None:
    response = srv.post(path, **body)
    error = response.json()["error"]
    assert response.status_code == 400, error
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert words in error["message"], error["message"]
