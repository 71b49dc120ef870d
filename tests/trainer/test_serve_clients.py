"""`llmtrain serve` driven by the clients users point at it: the official `openai` package and
lm-evaluation-harness's `local-completions` model, against a real child process on 127.0.0.1.

The model is a tiny random Llama with a ChatML template (llmtrain.testing_hf), so every expected
answer comes from the same weights run in this process: greedy continuations and log-probabilities
by full forward passes (no KV cache, no batching), which the server's batched, cached decode must
reproduce. Run with ``-s`` to see the client matrix (one line per case) and lm-eval's table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmtrain.serve.process import ServerProcess
from llmtrain.testing_hf import checkpoint

openai = pytest.importorskip("openai")

MODEL = "tiny-chat"
PROMPT = "Permission is hereby granted"
MESSAGES = [
    {"role": "system", "content": "You answer in licence prose."},
    {"role": "user", "content": "What does the licence grant?"},
]
# Log-probabilities from the server against this process's float32 forward of the same weights: the
# server's incremental (KV-cached, padded batch) passes differ from a full forward only by float
# rounding, about 1e-6 here; 1e-4 absolute catches any real mistake (wrong position, missing
# softmax, a penalty leaking in), which moves a value by far more.
LOGPROB_TOL = 1e-4
MATRIX: dict[str, str] = {}


@dataclass
class Reference:
    """The served model, in this process."""

    model: Any
    tokenizer: Any
    eos: frozenset[int]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text

    def token(self, token_id: int) -> str:
        """A token as OpenAI's logprobs name it: its text."""
        return self.decode([token_id]) if token_id not in self.eos else self.tokenizer.decode([token_id])

    def log_softmax(self, ids: list[int]) -> Any:
        """[len(ids), vocab] log-probabilities of each next token after ids[: i + 1]."""
        import torch

        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        ids = list(prompt)
        for _ in range(max_tokens):
            nxt = int(self.log_softmax(ids)[-1].argmax())
            ids.append(nxt)
            if nxt in self.eos:
                break
        return ids[len(prompt) :]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint("llama", tmp_path_factory.mktemp("clients") / "tiny-chat")


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> Reference:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    model.eval()
    eos = {tok.eos_token_id, model.config.eos_token_id, model.generation_config.eos_token_id}
    return Reference(model, tok, frozenset(int(e) for e in eos if e is not None))


class _FailureReasons:
    """A pytest plugin for this module's run: a failed case's matrix row says why it failed."""

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        case = report.head_line.split(".")[-1].removeprefix("test_") if report.head_line else ""
        if report.failed and case in MATRIX:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = str(getattr(crash, "message", report.longrepr)).splitlines()[0]
            MATRIX[case] = f"FAIL  {message[:150]}"


@pytest.fixture(scope="module")
def server(model_dir: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    reasons = _FailureReasons()
    request.config.pluginmanager.register(reasons, "serve-clients-failure-reasons")
    srv = ServerProcess(
        model_dir,
        "--model-name",
        MODEL,
        "--max-batch-size",
        "4",
        "--max-tokens-limit",
        "64",
        "--threads",
        "1",
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
        request.config.pluginmanager.unregister(reasons)
        print("\nclient matrix (openai " + openai.__version__ + ", llmtrain serve):")
        for case, line in MATRIX.items():
            print(f"  {case:<34} {line}")
    assert code == 0


@pytest.fixture
def client(server: ServerProcess) -> Any:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def matrix_row(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every case is FAIL until its test reaches record()."""
    case = request.node.name.removeprefix("test_")
    MATRIX[case] = "FAIL"
    yield


def record(request: pytest.FixtureRequest, values: str) -> None:
    MATRIX[request.node.name.removeprefix("test_")] = f"PASS  {values}"


def close(a: float, b: float) -> bool:
    return abs(a - b) <= LOGPROB_TOL


# --- models, completions, chat ---------------------------------------------------------------------


def test_models_list(client: Any, request: pytest.FixtureRequest) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]
    record(request, f"ids={ids}")


def test_completion_is_greedy_continuation(
    client: Any, ref: Reference, request: pytest.FixtureRequest
) -> None:
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    want = ref.greedy(ref.encode(PROMPT), 12)
    choice = answer.choices[0]
    assert choice.text == ref.decode(want)
    assert choice.finish_reason == ("stop" if want[-1] in ref.eos else "length")
    assert answer.usage.prompt_tokens == len(ref.encode(PROMPT))
    assert answer.usage.completion_tokens == len(want)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    record(request, f"text={choice.text!r} finish={choice.finish_reason} usage={answer.usage.total_tokens}")


def test_completion_stream(client: Any, ref: Reference, request: pytest.FixtureRequest) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    want = ref.greedy(ref.encode(PROMPT), 12)
    assert text == ref.decode(want)
    assert finish == ["stop" if want[-1] in ref.eos else "length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(want)
    record(request, f"{len(chunks)} chunks, joined text equals non-stream, usage in last chunk")


def test_chat_uses_the_chat_template(client: Any, ref: Reference, request: pytest.FixtureRequest) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    prompt = ref.chat_prompt(MESSAGES)
    want = ref.greedy(prompt, 12)
    msg = answer.choices[0].message
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert msg.role == "assistant" and msg.content == ref.decode(want)
    assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == len(want)
    record(request, f"content={msg.content!r} prompt_tokens={len(prompt)} (template applied)")


def test_chat_stream(client: Any, ref: Reference, request: pytest.FixtureRequest) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert deltas[0].role == "assistant"
    content = "".join(d.content or "" for d in deltas)
    assert content == ref.decode(ref.greedy(ref.chat_prompt(MESSAGES), 12))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    record(request, f"{len(chunks)} chunks, first delta role=assistant, joined content equals greedy")


# --- n, seed, stop -----------------------------------------------------------------------------------


def test_n2(client: Any, ref: Reference, request: pytest.FixtureRequest) -> None:
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    want = ref.decode(ref.greedy(ref.encode(PROMPT), 8))
    assert [c.text for c in greedy.choices] == [want, want]
    sampled = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=3, n=2
    )
    texts = [c.message.content for c in sampled.choices]
    assert [c.index for c in sampled.choices] == [0, 1]
    # Two samples of 16 tokens from a near-uniform 512-token distribution agree with odds ~1e-40.
    assert texts[0] != texts[1]
    assert greedy.usage.completion_tokens == 2 * len(ref.greedy(ref.encode(PROMPT), 8))
    record(request, f"completions greedy 2x{want!r}; chat sampled 2 distinct choices")


def test_seed_reproducible(client: Any, request: pytest.FixtureRequest) -> None:
    def sample(seed: int) -> str:
        answer = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed
        )
        return str(answer.choices[0].text)

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other  # as in test_n2: a collision is astronomically unlikely
    record(request, f"seed=7 twice equal ({first[:24]!r}...), seed=8 differs")


def stop_inside(text: str) -> str:
    """Two characters from the second half of a greedy text: the answer must end just before them.
    Not a U+FFFD, which stands for a UTF-8 character still incomplete while it is generated."""
    for i in range(len(text) // 2, len(text) - 1):
        if "\ufffd" not in text[i : i + 2] and text[i : i + 2].strip():
            return text[i : i + 2]
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_sequences(client: Any, ref: Reference, request: pytest.FixtureRequest) -> None:
    full = ref.decode(ref.greedy(ref.encode(PROMPT), 16))
    stop = stop_inside(full)
    want = full[: full.find(stop)]
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert answer.choices[0].text == want and answer.choices[0].finish_reason == "stop"
    chat_full = ref.decode(ref.greedy(ref.chat_prompt(MESSAGES), 16))
    chat_stop = stop_inside(chat_full)
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, stop=chat_stop
    )
    assert chat.choices[0].message.content == chat_full[: chat_full.find(chat_stop)]
    assert chat.choices[0].finish_reason == "stop"
    record(request, f"stop={stop!r} -> {want!r} finish=stop; chat too")


# --- logprobs, echo ----------------------------------------------------------------------------------


def top2(ref: Reference, row: Any) -> dict[str, float]:
    values, ids = row.topk(2)
    return {ref.token(int(i)): float(v) for v, i in zip(values, ids, strict=True)}


def test_completion_logprobs(client: Any, ref: Reference, request: pytest.FixtureRequest) -> None:
    prompt = ref.encode(PROMPT)
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    gen = ref.greedy(prompt, 8)
    rows = ref.log_softmax(prompt + gen)[len(prompt) - 1 : -1]
    lp = answer.choices[0].logprobs
    assert lp.tokens == [ref.token(t) for t in gen]
    assert len(lp.token_logprobs) == len(gen) and len(lp.top_logprobs) == len(gen)
    worst = 0.0
    for got, top, token_id, row in zip(lp.token_logprobs, lp.top_logprobs, gen, rows, strict=True):
        want_top = top2(ref, row)
        assert set(top) == set(want_top)
        worst = max([worst, abs(got - float(row[token_id]))] + [abs(top[k] - want_top[k]) for k in top])
    assert worst <= LOGPROB_TOL
    assert lp.text_offset[0] == len(PROMPT) and len(lp.text_offset) == len(gen)
    record(request, f"{len(gen)} tokens x top-2, max |diff| vs in-process {worst:.1e} (tol {LOGPROB_TOL:g})")


def test_chat_logprobs(client: Any, ref: Reference, request: pytest.FixtureRequest) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    prompt = ref.chat_prompt(MESSAGES)
    gen = ref.greedy(prompt, 8)
    rows = ref.log_softmax(prompt + gen)[len(prompt) - 1 : -1]
    content = answer.choices[0].logprobs.content
    assert [c.token for c in content] == [ref.token(t) for t in gen]
    worst = 0.0
    for item, token_id, row in zip(content, gen, rows, strict=True):
        want_top = top2(ref, row)
        assert {t.token: t.logprob for t in item.top_logprobs}.keys() == want_top.keys()
        assert item.bytes == list(item.token.encode())
        worst = max(
            [worst, abs(item.logprob - float(row[token_id]))]
            + [abs(t.logprob - want_top[t.token]) for t in item.top_logprobs]
        )
    assert worst <= LOGPROB_TOL
    record(request, f"{len(gen)} tokens x top-2, max |diff| vs in-process {worst:.1e} (tol {LOGPROB_TOL:g})")


def test_echo_scoring_of_token_ids(client: Any, ref: Reference, request: pytest.FixtureRequest) -> None:
    """What evaluation harnesses send: token-id prompts, echo, max_tokens=0: the prompt's own logprobs."""
    prompt = ref.encode(PROMPT + " to any person obtaining a copy")
    answer = client.completions.create(model=MODEL, prompt=[prompt], max_tokens=0, echo=True, logprobs=1)
    lp = answer.choices[0].logprobs
    rows = ref.log_softmax(prompt)
    assert answer.choices[0].text == ref.decode(prompt)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt)
    diffs = [abs(lp.token_logprobs[i] - float(rows[i - 1, prompt[i]])) for i in range(1, len(prompt))]
    assert max(diffs) <= LOGPROB_TOL
    assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == 0
    record(request, f"{len(prompt)} prompt tokens scored, max |diff| {max(diffs):.1e}, completion_tokens=0")


def test_frequency_penalty(client: Any, ref: Reference, request: pytest.FixtureRequest) -> None:
    """OpenAI's definition: logit[t] -= count(t in the completion) * frequency + (count > 0) * presence."""
    import torch

    prompt = ref.encode(PROMPT)
    gen: list[int] = []
    for _ in range(16):
        with torch.no_grad():
            logits = ref.model(torch.tensor([prompt + gen])).logits[0, -1].float()
        for t in set(gen):
            logits[t] -= gen.count(t) * 1.5 + 0.5
        gen.append(int(logits.argmax()))
        if gen[-1] in ref.eos:
            break
    answer = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, frequency_penalty=1.5, presence_penalty=0.5
    )
    assert answer.choices[0].text == ref.decode(gen)
    plain = ref.decode(ref.greedy(prompt, 16))
    record(request, f"penalised greedy {answer.choices[0].text!r} (unpenalised {plain!r})")


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param,value", [("best_of", 2), ("suffix", " the end")])
def test_unsupported_parameter(client: Any, param: str, value: Any, request: pytest.FixtureRequest) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, **{param: value})
    err = caught.value
    assert err.status_code == 400 and err.param == param and err.code == "unsupported_parameter"
    assert err.type == "invalid_request_error"
    record(request, f"BadRequestError code={err.code} param={err.param}")


def test_wrong_model_name(client: Any, request: pytest.FixtureRequest) -> None:
    with pytest.raises(openai.NotFoundError) as completion:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.NotFoundError) as chat:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    for err in (completion.value, chat.value):
        assert err.code == "model_not_found" and err.param == "model"
    record(request, f"NotFoundError code={completion.value.code} (completions and chat)")


# --- lm-evaluation-harness ---------------------------------------------------------------------------

DOCS = [
    {"question": "Permission is hereby", "choices": ["granted", "refused", "the"], "answer": 0},
    {"question": "THE SOFTWARE IS PROVIDED", "choices": ["AS IS", "free", "by"], "answer": 0},
    {"question": "Redistribution and use in source and", "choices": ["binary forms", "copies"], "answer": 0},
    {"question": "This program is free", "choices": ["software", "of charge", "speech"], "answer": 0},
]
TASK = """\
task: llmop_licence_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_local_completions(
    server: ServerProcess, model_dir: Path, ref: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-eval scores each choice through /v1/completions (token ids, echo, logprobs=1, max_tokens=1)
    and sums the continuation's logprobs: each sum must equal this process's within 1e-3."""
    # Before lm_eval imports datasets and huggingface_hub, which read these once, at import.
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped]
    from lm_eval.utils import make_table  # type: ignore[import-untyped]

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "llmop_licence_mc.yaml").write_text(TASK.format(data=data))
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(
            f"base_url=http://127.0.0.1:{server.port}/v1/completions,model={MODEL},tokenizer={model_dir},"
            "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,max_length=256"
        ),
        tasks=["llmop_licence_mc"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    assert results is not None
    print("\n" + make_table(results))
    worst, lines = 0.0, []
    for sample in results["samples"]["llmop_licence_mc"]:
        for args, (loglik, greedy) in zip(_arguments(sample), sample["filtered_resps"], strict=True):
            context, continuation = args
            # lm-eval's own split (TemplateLM._encode_pair): the whole string's tokens after the context's.
            whole, ctx = ref.encode(context + continuation), ref.encode(context)
            cont = whole[len(ctx) :]
            rows = ref.log_softmax(whole)[len(ctx) - 1 : -1]
            want = sum(float(rows[i, t]) for i, t in enumerate(cont))
            want_greedy = all(int(rows[i].argmax()) == t for i, t in enumerate(cont))
            worst = max(worst, abs(loglik - want))
            assert abs(loglik - want) <= 1e-3, (context, continuation, loglik, want)
            assert greedy == want_greedy
            lines.append(f"  {context + continuation!r:<52} lm-eval {loglik:10.5f}  in-process {want:10.5f}")
    print("lm-eval loglikelihood vs in-process sum of log_softmax over the continuation:")
    print("\n".join(lines))
    print(f"max |diff| {worst:.1e} (tolerance 1e-3)")
    MATRIX["lm_eval_local_completions"] = f"PASS  {len(lines)} loglikelihoods, max |diff| {worst:.1e}"


def _arguments(sample: dict[str, Any]) -> list[tuple[str, str]]:
    """(context, continuation) per choice: a list of pairs, or {"gen_args_i": {"arg_0", "arg_1"}} in newer
    lm-eval versions."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return [(str(a["arg_0"]), str(a["arg_1"])) for a in args.values()]
    return [(str(a[0]), str(a[1])) for a in args]
