"""Wick through the official openai Python client, against the real binary and model."""
import json
import urllib.request

import jsonschema
import openai
import pytest

from conftest import API_KEY, MODEL

MESSAGES = [{"role": "user", "content": "List three fruits that are red."}]


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=40)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=30)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=30,
        stream=True, stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_max_tokens_gives_length_and_exact_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    # The usage numbers are the token counts: the prompt, tokenized by the server itself.
    tok = _post(client, "/tokenize", {"model": MODEL, "messages": MESSAGES})
    assert r.usage.prompt_tokens == tok["count"]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_n_choices_each_with_an_index(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, temperature=1.0, seed=5, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    # Two different samples of one prompt: the prompt counted once, the outputs summed.
    assert r.choices[0].message.content != r.choices[1].message.content
    single = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens
    assert 2 <= r.usage.completion_tokens <= 24


def test_seed_reproducible(client):
    kw = dict(model=MODEL, messages=MESSAGES, temperature=1.0, top_p=0.95, max_tokens=20)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=99, **kw).choices[0].message.content
    assert a == b
    assert a != c


def test_stop_strings(client):
    base = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=40)
    text = base.choices[0].message.content
    word = text.split()[2]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=40, stop=[word])
    assert r.choices[0].message.content == text[: text.index(word)]
    assert r.choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_streaming_logprobs(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True, top_logprobs=1, stream=True,
    )
    tokens = [t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert len(tokens) == 6


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text
    assert r.usage.completion_tokens == 8
    s = client.completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text
    # Several prompts, and token ids.
    ids = _post(client, "/tokenize", {"prompt": "The three primary colors are"})["tokens"]
    other = _post(client, "/tokenize", {"prompt": "Once upon a time"})["tokens"]
    r2 = client.completions.create(model=MODEL, prompt=[ids, other], max_tokens=8, temperature=0)
    assert [c.index for c in r2.choices] == [0, 1]
    assert r2.choices[0].text == r.choices[0].text
    r4 = client.completions.create(model=MODEL, prompt=["Once upon a time", "The three primary colors are"], max_tokens=8, temperature=0)
    assert r4.choices[0].text == r2.choices[1].text
    assert r4.choices[1].text == r.choices[0].text
    assert r4.usage.prompt_tokens == len(ids) + len(other)
    r3 = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = r3.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r3.choices[0].text


def test_sampling_extensions(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=8, seed=3)
    r = client.chat.completions.create(
        temperature=0.8, extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1}, **kw
    )
    assert r.choices[0].message.content
    r = client.chat.completions.create(
        temperature=0, presence_penalty=1.0, frequency_penalty=0.5, **kw
    )
    assert r.choices[0].message.content
    # logit_bias forces a token; ignore_eos keeps going to max_tokens.
    forced = _post(client, "/tokenize", {"prompt": " banana"})["tokens"][0]
    r = client.chat.completions.create(
        temperature=0, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True}, **kw
    )
    assert r.choices[0].message.content == " banana" * 8
    assert r.choices[0].finish_reason == "length"


def test_json_object_output_parses(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object with the keys name and age for a person called Bob who is 42."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
    )
    assert r.choices[0].finish_reason == "stop"
    value = json.loads(r.choices[0].message.content)
    assert isinstance(value, dict)


def test_json_schema_output_validates(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        },
        "required": ["name", "age", "colors"],
        "additionalProperties": False,
    }
    for seed in (1, 2):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Describe a person as JSON: name, age and favourite colors."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
            temperature=0.7,
            seed=seed,
            max_tokens=200,
        )
        assert r.choices[0].finish_reason == "stop"
        value = json.loads(r.choices[0].message.content)
        jsonschema.validate(value, schema)
    # Streaming too.
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        temperature=0, max_tokens=200, stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)


def test_tokenize_detokenize(client):
    tok = _post(client, "/tokenize", {"prompt": "Hello, world!"})
    assert tok["tokens"] == [19556, 28, 905, 17]
    assert _post(client, "/detokenize", {"tokens": tok["tokens"]})["prompt"] == "Hello, world!"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"frobnicate": True}, "frobnicate"),
    ],
)
def test_bad_fields_are_400s_naming_the_param(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, extra_body=extra)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"


def test_bad_key_is_401(server):
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"
    # Health and metrics stay open.
    with urllib.request.urlopen(server + "/health") as r:
        assert r.status == 200
    with urllib.request.urlopen(server + "/metrics") as r:
        assert b"wick_requests_running" in r.read()


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_models_retrieve_gives_the_served_models_card(client):
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.owned_by) == (MODEL, "model", "wick")
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"
    assert e.value.body["param"] == "model"


def _post(client, path, body):
    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def test_tools_on_a_model_without_tool_support_is_a_400(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[tool])
    assert e.value.body["param"] == "tools"
    assert "no tool support" in e.value.body["message"]
    # tool_choice none: the tools are not used, the chat is served.
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[tool], tool_choice="none", max_tokens=3
    )
    assert r.choices[0].message.content is not None and not r.choices[0].message.tool_calls
