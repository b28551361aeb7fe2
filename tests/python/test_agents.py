"""Agents' APIs through the official clients, against the real binary on the Qwen test model
(its template has Hermes tool calls): tool calling on chat completions (auto, required, a
named tool; streamed and not; a second turn with the tool's result), the Responses API and
Anthropic's Messages API. The Qwen model is four times the default's work per token: every
case is greedy and short."""
import json
import urllib.request

import anthropic
import jsonschema
import openai
import pytest

from conftest import API_KEY
from test_families import QWEN

CASE = QWEN["q-tool"]  # llama.cpp's greedy answer here is a bare get_weather call
WEATHER = CASE["tools"][0]
SCHEMA = WEATHER["function"]["parameters"]
ASK = CASE["messages"]


def chat(client, **kw):
    args = dict(model="qwen", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=40)
    args.update(kw)
    return client.chat.completions.create(**args)


def assert_weather_call(call):
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)


def streamed(client, **kw):
    """The message the official client's stream accumulator assembles."""
    args = dict(model="qwen", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=40)
    args.update(kw)
    with client.chat.completions.stream(**args) as s:
        for event in s:
            # No tool-call markup ever reaches content.
            if event.type == "content.delta":
                assert "<tool_call>" not in event.delta and '{"name"' not in event.delta
        return s.get_final_completion().choices[0]


@pytest.mark.parametrize(
    "choice",
    ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["auto", "required", "named"],
)
def test_tool_calls_streamed_equal_non_streamed(qwen, choice):
    full = chat(qwen, tool_choice=choice).choices[0]
    assert full.finish_reason == "tool_calls", full
    assert full.message.content is None
    assert len(full.message.tool_calls) == 1
    assert_weather_call(full.message.tool_calls[0])
    # llama.cpp's greedy answer on this prompt, as a call.
    assert json.loads(full.message.tool_calls[0].function.arguments) == {"city": "Paris"}
    s = streamed(qwen, tool_choice=choice)
    assert s.finish_reason == "tool_calls"
    assert s.message.content is None
    got = [(c.function.name, c.function.arguments) for c in s.message.tool_calls]
    want = [(c.function.name, c.function.arguments) for c in full.message.tool_calls]
    assert got == want


def tokenize(base, body):
    req = urllib.request.Request(
        base + "/tokenize", data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)["tokens"]


def detokenize(base, tokens):
    req = urllib.request.Request(
        base + "/detokenize", data=json.dumps({"tokens": tokens}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)["prompt"]


def test_the_tool_result_goes_back_through_the_template(qwen, qwen_server):
    call = chat(qwen, tool_choice="required").choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'},
    ]
    r = chat(qwen, messages=messages, max_tokens=30)
    # The second turn is served: a valid answer (this 0.5B model calls the tool again).
    reply = r.choices[0]
    assert reply.finish_reason in ("stop", "tool_calls", "length")
    assert reply.message.content or reply.message.tool_calls
    for c in reply.message.tool_calls or []:
        assert_weather_call(c)
    # The prompt holds the call and its result as the template writes them.
    ids = tokenize(qwen_server, {"model": "qwen", "messages": messages, "tools": [WEATHER]})
    assert r.usage.prompt_tokens == len(ids)
    text = detokenize(qwen_server, ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text, text
    assert '<tool_response>\n{"temperature_c": 18, "sky": "sunny"}\n</tool_response>' in text, text


def test_a_model_that_does_not_think_has_no_reasoning(qwen):
    r = qwen.chat.completions.with_raw_response.create(
        model="qwen", messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=5
    )
    message = json.loads(r.text)["choices"][0]["message"]
    assert "reasoning_content" not in message and "reasoning" not in message
    assert message["content"]


def test_responses_with_and_without_stream(qwen):
    r = qwen.responses.create(
        model="qwen", input="Say hello.", instructions="Answer in one short sentence.",
        temperature=0, max_output_tokens=16, store=False, metadata={"run": "test"},
    )
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.usage.output_tokens <= 16 and r.usage.input_tokens > 0
    with qwen.responses.stream(
        model="qwen", input="Say hello.", instructions="Answer in one short sentence.",
        temperature=0, max_output_tokens=16,
    ) as s:
        deltas = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        final = s.get_final_response()
    assert deltas == final.output_text == r.output_text


def test_responses_tool_call_and_its_output(qwen):
    tool = {"type": "function", "name": "get_weather", "description": WEATHER["function"]["description"], "parameters": SCHEMA}
    r = qwen.responses.create(
        model="qwen", input=ASK[0]["content"], tools=[tool], tool_choice="required",
        temperature=0, max_output_tokens=40,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", r.output
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMA)
    with qwen.responses.stream(
        model="qwen", input=ASK[0]["content"], tools=[tool], tool_choice="required",
        temperature=0, max_output_tokens=40,
    ) as s:
        final = s.get_final_response()
    streamed_calls = [(o.name, o.arguments) for o in final.output if o.type == "function_call"]
    assert streamed_calls == [(calls[0].name, calls[0].arguments)]
    # The call's output, sent back as an input item.
    r2 = qwen.responses.create(
        model="qwen", tools=[tool], temperature=0, max_output_tokens=24,
        input=[
            {"role": "user", "content": ASK[0]["content"]},
            {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature_c": 18}'},
        ],
    )
    assert r2.status in ("completed", "incomplete") and r2.output, r2
    assert r2.usage.input_tokens > r.usage.input_tokens + 10


def test_responses_json_schema_through_text_format(qwen):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    r = qwen.responses.create(
        model="qwen", input="Name the capital of France and its country.", temperature=0, max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
    )
    jsonschema.validate(json.loads(r.output_text), schema)


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_responses_refusals_name_the_field(qwen, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        qwen.responses.create(model="qwen", input="hi", **extra)
    assert e.value.body["param"] == param


def test_anthropic_messages_and_stream(qwen_anthropic):
    # Greedy through `temperature` (this client version no longer has the parameter).
    kw = dict(model="qwen", max_tokens=16, system="Answer in one short sentence.", extra_body={"temperature": 0},
              messages=[{"role": "user", "content": "Say hello."}], metadata={"user_id": "u1"})
    m = qwen_anthropic.messages.create(**kw)
    assert m.type == "message" and m.role == "assistant"
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    with qwen_anthropic.messages.stream(**kw) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == final.content[0].text == m.content[0].text
    assert final.usage.output_tokens == m.usage.output_tokens
    n = qwen_anthropic.messages.count_tokens(model="qwen", system=kw["system"], messages=kw["messages"])
    assert n.input_tokens == m.usage.input_tokens


def test_anthropic_tool_use_and_result(qwen_anthropic):
    tool = {"name": "get_weather", "description": WEATHER["function"]["description"], "input_schema": SCHEMA}
    kw = dict(model="qwen", max_tokens=40, extra_body={"temperature": 0}, tools=[tool], tool_choice={"type": "any"},
              messages=[{"role": "user", "content": ASK[0]["content"]}])
    m = qwen_anthropic.messages.create(**kw)
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and uses and uses[0].name == "get_weather", m.content
    jsonschema.validate(uses[0].input, SCHEMA)
    with qwen_anthropic.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(u.name, u.input) for u in uses]
    messages = kw["messages"] + [
        {"role": "assistant", "content": [u.model_dump() for u in uses]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": "18 C, sunny"} for u in uses]},
    ]
    reply = qwen_anthropic.messages.create(
        model="qwen", max_tokens=24, extra_body={"temperature": 0}, tools=[tool], messages=messages,
    )
    assert reply.content and reply.stop_reason in ("end_turn", "tool_use", "max_tokens"), reply
    counted = qwen_anthropic.messages.count_tokens(model="qwen", tools=[tool], messages=messages)
    assert counted.input_tokens == reply.usage.input_tokens > m.usage.input_tokens + 10


def test_anthropic_errors_in_anthropics_shape(qwen_anthropic, qwen_server):
    with pytest.raises(anthropic.NotFoundError) as e:
        qwen_anthropic.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        qwen_anthropic.messages.create(model="qwen", max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "invalid_request_error" and "max_tokens" in e.value.body["error"]["message"]
    bad_key = anthropic.Anthropic(base_url=qwen_server, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad_key.messages.create(model="qwen", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "authentication_error"
