"""Ollama's native API (/api/) through the official `ollama` client and LangChain's
ChatOllama, against the real binary: chat and generate streamed and not (equal under greedy
settings, and equal to the OpenAI dialect's answer), options honoured, embed, list, show,
ps, tools on the Qwen model (a call, then the answer after its result), `format` with a JSON
schema, logprobs, and errors raised as ResponseError with their status. Every case is greedy and short."""
import json
import math
import urllib.request
from datetime import datetime

import jsonschema
import ollama
import pytest

from conftest import API_KEY, MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = {"temperature": 0, "num_predict": 16}
HI = [{"role": "user", "content": "Tell me about the moon."}]


def client(base, **kw):
    return ollama.Client(host=base, headers=AUTH, **kw)


@pytest.fixture(scope="session")
def ol(server):
    return client(server)


@pytest.fixture(scope="session")
def ol_multi(multi_server):
    return client(multi_server)


@pytest.fixture(scope="session")
def ol_qwen(qwen_server):
    return client(qwen_server)


def test_chat_streamed_equals_non_streamed_and_the_openai_answer(ol, client):
    whole = ol.chat(model=MODEL, messages=HI, options=GREEDY)
    assert whole.done and whole.done_reason == "length"
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count == 16 and whole.prompt_eval_count > 0
    for d in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(whole, d), int) and getattr(whole, d) > 0, d
    assert whole.total_duration >= whole.eval_duration
    chunks = list(ol.chat(model=MODEL, messages=HI, options=GREEDY, stream=True))
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c.message.content for c in chunks) == whole.message.content
    last = chunks[-1]
    assert (last.done_reason, last.eval_count, last.prompt_eval_count) == (
        "length",
        16,
        whole.prompt_eval_count,
    )
    # The same request in OpenAI's dialect is the same generation.
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=16)
    assert r.choices[0].message.content == whole.message.content
    assert r.usage.prompt_tokens == whole.prompt_eval_count


def test_generate_streamed_equals_non_streamed(ol, client):
    whole = ol.generate(model=MODEL, prompt="The capital of France is", options=GREEDY)
    assert whole.done and whole.response and whole.eval_count == 16
    parts = list(ol.generate(model=MODEL, prompt="The capital of France is", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].done and parts[-1].done_reason == "length"
    # Through the chat template as one user turn, as Ollama does.
    chat = ol.chat(model=MODEL, messages=[{"role": "user", "content": "The capital of France is"}], options=GREEDY)
    assert chat.message.content == whole.response
    # raw: the prompt as it is, as OpenAI's completions take it.
    raw = ol.generate(model=MODEL, prompt="The capital of France is", raw=True, options=GREEDY)
    c = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=16)
    assert raw.response == c.choices[0].text
    # An empty prompt loads the model (it is loaded): one reply, done_reason "load".
    load = ol.generate(model=MODEL)
    assert load.done and load.done_reason == "load" and load.response == ""


def test_options_are_honoured(ol):
    short = ol.chat(model=MODEL, messages=HI, options={"temperature": 0, "num_predict": 5})
    assert short.eval_count == 5 and short.done_reason == "length"
    text = ol.chat(model=MODEL, messages=HI, options=GREEDY).message.content
    words = text.split()
    stop = words[len(words) // 2]
    cut = ol.chat(model=MODEL, messages=HI, options={**GREEDY, "stop": [stop]})
    assert cut.done_reason == "stop"
    assert stop not in cut.message.content and text.startswith(cut.message.content)
    seeded = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_predict": 24}
    a = ol.chat(model=MODEL, messages=HI, options={**seeded, "seed": 7}).message.content
    b = ol.chat(model=MODEL, messages=HI, options={**seeded, "seed": 7}).message.content
    c = ol.chat(model=MODEL, messages=HI, options={**seeded, "seed": 8}).message.content
    assert a == b and a != c
    # num_ctx bounds prompt and output; num_predict is a cap, cut to what the context leaves.
    with pytest.raises(ollama.ResponseError) as e:
        ol.chat(model=MODEL, messages=HI, options={"num_ctx": 8})
    assert e.value.status_code == 400 and "num_ctx" in e.value.error
    capped = ol.chat(model=MODEL, messages=HI, options={"temperature": 0, "num_ctx": 40, "num_predict": 1000})
    assert capped.done_reason == "length" and capped.prompt_eval_count + capped.eval_count == 40
    # More stop strings than OpenAI's four (Ollama sets no limit), and the default tag.
    many = ol.chat(model=MODEL + ":latest", messages=HI, options={**GREEDY, "stop": ["zq1", "zq2", "zq3", "zq4", stop]})
    assert many.message.content == cut.message.content and many.model == MODEL
    # Options that only place the model, and null values (clients send both), are accepted.
    ol.chat(model=MODEL, messages=HI, options={**GREEDY, "num_thread": 2, "num_gpu": 0, "top_k": None})


def test_logprobs_as_on_the_openai_dialect(ol, client):
    whole = ol.chat(model=MODEL, messages=HI, options=GREEDY, logprobs=True, top_logprobs=2)
    assert len(whole.logprobs) == whole.eval_count == 16
    assert all(len(lp.top_logprobs) == 2 for lp in whole.logprobs)
    assert "".join(lp.token for lp in whole.logprobs) == whole.message.content
    streamed = [lp for c in ol.chat(model=MODEL, messages=HI, options=GREEDY, logprobs=True, top_logprobs=2, stream=True) for lp in (c.logprobs or [])]
    assert [(lp.token, lp.logprob) for lp in streamed] == [(lp.token, lp.logprob) for lp in whole.logprobs]
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=16, logprobs=True, top_logprobs=2)
    want = [(t.token, t.logprob) for t in r.choices[0].logprobs.content]
    assert [(lp.token, lp.logprob) for lp in whole.logprobs] == want


def test_format_takes_a_json_schema(ol):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = ol.chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Bob is 30 years old. Give his name and age as JSON."}],
        format=schema,
        options={"temperature": 0, "num_predict": 60},
    )
    jsonschema.validate(json.loads(r.message.content), schema)
    r = ol.generate(
        model=MODEL,
        prompt='Give a JSON object with the key "color" for the color of the sky.',
        format="json",
        options={"temperature": 0, "num_predict": 300},
    )
    assert r.done_reason == "stop" and isinstance(json.loads(r.response), dict), r.response


def test_embed_list_show_and_ps(ol_multi, multi):
    r = ol_multi.embed(model="minilm", input=["the moon", "la lune"])
    assert len(r.embeddings) == 2 and r.prompt_eval_count > 0
    v = r.embeddings[0]
    assert len(v) == 384 and abs(math.fsum(x * x for x in v) - 1) < 1e-4
    ref = multi.embeddings.create(model="minilm", input=["the moon", "la lune"]).data
    for got, want in zip(r.embeddings, ref):
        assert max(abs(a - b) for a, b in zip(got, want.embedding)) < 1e-6
    # dimensions: the first values, renormalized.
    short = ol_multi.embed(model="minilm", input="the moon", dimensions=128).embeddings[0]
    norm = math.sqrt(math.fsum(x * x for x in v[:128]))
    assert len(short) == 128 and max(abs(a - b / norm) for a, b in zip(short, v[:128])) < 1e-5
    # The older route gives the same vector.
    old = ol_multi.embeddings(model="minilm", prompt="the moon").embedding
    assert max(abs(a - b) for a, b in zip(old, v)) < 1e-6
    # A long input is cut keeping its start (truncate defaults to true): the same vector as
    # a shorter input with that start; or refused with truncate false.
    long = "sun " + " ".join(["moon"] * 600)
    cut, shorter, reversed_ = ol_multi.embed(
        model="minilm", input=[long, "sun " + " ".join(["moon"] * 300), " ".join(["moon"] * 600) + " sun"]
    ).embeddings
    assert max(abs(a - b) for a, b in zip(cut, shorter)) < 1e-6
    assert max(abs(a - b) for a, b in zip(cut, reversed_)) > 1e-3
    # An empty string among the inputs is embedded (its special tokens alone).
    assert [len(e) for e in ol_multi.embed(model="minilm", input=["the moon", ""]).embeddings] == [384, 384]
    with pytest.raises(ollama.ResponseError) as e:
        ol_multi.embed(model="minilm", input=long, truncate=False)
    assert e.value.status_code == 400 and "context length" in e.value.error

    listed = {m.model: m for m in ol_multi.list().models}
    assert set(listed) == {MODEL, "minilm"}
    d = listed[MODEL].details
    assert (d.format, d.family, d.quantization_level) == ("gguf", "llama", "Q4_1")
    assert d.parameter_size == "134.52M", d.parameter_size  # Ollama's HumanNumber
    assert listed[MODEL].size > 50_000_000 and len(listed[MODEL].digest) == 64
    assert listed["minilm"].details.family == "bert"

    s = ol_multi.show(MODEL)
    assert "completion" in s.capabilities and "tools" not in s.capabilities
    assert s.modelinfo["llama.context_length"] > 0 and s.modelinfo["general.parameter_count"] > 1e8
    assert "<|im_start|>" in s.template  # the model's own (Jinja) chat template
    assert ol_multi.show("minilm").capabilities == ["embedding"]

    running = {m.model: m for m in ol_multi.ps().models}
    assert set(running) == {MODEL, "minilm"}
    assert isinstance(running[MODEL].expires_at, datetime)
    assert running[MODEL].context_length > 0


def get_weather(city: str) -> str:
    """Get the current weather in a city.

    Args:
      city: The city's name
    """
    return json.dumps({"city": city, "temperature_c": 18, "sky": "sunny"})


WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_tool_call_then_the_answer_after_its_result(ol_qwen, qwen_server):
    r = ol_qwen.chat(model="qwen", messages=WEATHER_ASK, tools=[get_weather], options={"temperature": 0, "num_predict": 40})
    assert r.done_reason == "stop" and r.message.content == ""
    [call] = r.message.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "Paris"}
    # Streamed, the same call, whole, in one chunk.
    chunks = list(ol_qwen.chat(model="qwen", messages=WEATHER_ASK, tools=[get_weather], options={"temperature": 0, "num_predict": 40}, stream=True))
    calls = [c for ch in chunks for c in (ch.message.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert "".join(ch.message.content for ch in chunks) == ""

    result = get_weather(**call.function.arguments)
    messages = WEATHER_ASK + [r.message, {"role": "tool", "content": result, "tool_name": "get_weather"}]
    r2 = ol_qwen.chat(model="qwen", messages=messages, tools=[get_weather], options={"temperature": 0, "num_predict": 30})
    assert r2.message.content or r2.message.tool_calls
    # The prompt held the call and its result as the template writes them.
    openai_messages = WEATHER_ASK + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(call.function.arguments)}}]},
        {"role": "tool", "tool_call_id": "c", "content": result},
    ]
    tool = ollama._utils.convert_function_to_tool(get_weather).model_dump(exclude_none=True)
    req = urllib.request.Request(
        qwen_server + "/tokenize",
        data=json.dumps({"model": "qwen", "messages": openai_messages, "tools": [tool]}).encode(),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        assert r2.prompt_eval_count == json.load(resp)["count"]


def test_errors_are_response_errors_with_their_status(ol, server):
    cases = [
        (lambda: ol.chat(model="nope", messages=HI), 404, "model 'nope' not found"),
        (lambda: ol.chat(model=MODEL, messages=HI, options={"temperature": 9}), 400, "options.temperature"),
        (lambda: ol.chat(model=MODEL, messages=HI, options={"warp": 1}), 400, "warp"),
        (lambda: ol.chat(model=MODEL, messages=HI, think=True), 400, '"smollm2" does not support thinking'),
        (lambda: ol.chat(model=MODEL, messages=[{"role": "user", "content": "x", "images": ["aGk="]}]), 400, "vision"),
        (lambda: ol.generate(model=MODEL, prompt="def f(", suffix=")"), 400, "does not support insert"),
        (lambda: ol.embed(model=MODEL, input="x"), 400, "not an embedding model"),
        (lambda: ol.pull("smollm2"), 501, "cannot pull"),
        (lambda: ol.create(model="m", from_=MODEL), 501, "Modelfile"),
        (lambda: ollama.Client(host=server).list(), 401, "API key"),
    ]
    for call, status, text in cases:
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == status and text in e.value.error, (status, text, e.value)
    # Streamed, an error before the first chunk is the status too.
    with pytest.raises(ollama.ResponseError) as e:
        list(ol.chat(model="nope", messages=HI, stream=True))
    assert e.value.status_code == 404


def test_langchain_chat_ollama_invoke_stream_and_tools(qwen_server):
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model="qwen", base_url=qwen_server, temperature=0, num_predict=16, client_kwargs={"headers": AUTH})
    msg = llm.invoke("Say hello.")
    assert msg.content and msg.usage_metadata["input_tokens"] > 0
    assert msg.usage_metadata["output_tokens"] <= 16
    assert msg.response_metadata["done_reason"] in ("stop", "length")
    assert "".join(c.content for c in llm.stream("Say hello.")) == msg.content
    tools = ChatOllama(model="qwen", base_url=qwen_server, temperature=0, num_predict=40, client_kwargs={"headers": AUTH})
    call = tools.bind_tools([get_weather]).invoke("What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in call.tool_calls] == [("get_weather", {"city": "Paris"})]
