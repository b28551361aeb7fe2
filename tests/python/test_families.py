"""The other model families through the official openai client, against the real binary:
Qwen2.5-Coder (qwen2, byte-level BPE, ChatML) chats, streaming and not; Gemma 3 (gemma3,
SentencePiece, a base model without a chat template) completes, and refuses chat clearly.
Greedy outputs are checked against llama.cpp's on the same files (tests/data/reference)."""
import json
import pathlib

import openai
import pytest

REFERENCE = pathlib.Path(__file__).parents[1] / "data" / "reference"


def reference(name):
    data = json.loads((REFERENCE / name).read_text())
    return {c["id"]: c for c in data["cases"]}


def decisive(case):
    """llama.cpp's greedy text up to its first near-tie, without the end-of-turn token (which
    ends a reply rather than being part of it)."""
    return case["decisive_prefix_text"].removesuffix("<|im_end|>")


QWEN = reference("qwen2.5-coder-0.5b-q4_k_m.llamacpp.json")
GEMMA = reference("gemma-3-270m-q4_k_m.llamacpp.json")


def test_qwen_chat_gives_llama_cpps_greedy_text(qwen):
    case = QWEN["q-fib"]
    r = qwen.chat.completions.create(model="qwen", messages=case["messages"], temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    # Equal through the steps where llama.cpp's top two are far apart.
    assert text.startswith(decisive(case)), text
    assert r.usage.prompt_tokens == len(case["prompt_ids"])
    assert r.choices[0].finish_reason == "length"


def test_qwen_streaming_equals_non_streaming(qwen):
    case = QWEN["q-2turn"]
    full = qwen.chat.completions.create(model="qwen", messages=case["messages"], temperature=0, max_tokens=20)
    stream = qwen.chat.completions.create(
        model="qwen", messages=case["messages"], temperature=0, max_tokens=20,
        stream=True, stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == full.choices[0].message.content
    assert text.startswith(decisive(case)), text
    assert finish == full.choices[0].finish_reason == "stop"
    assert usage.completion_tokens == full.usage.completion_tokens


def test_qwen_model_card_reports_its_context(qwen):
    cards = qwen.models.list().data
    assert [c.id for c in cards] == ["qwen"]
    card = cards[0].model_dump()
    assert card["context_length"] == 32768
    # What this server accepts: the model's context, or the KV cache's 256 blocks of 16.
    assert card["max_model_len"] == 256 * 16


def test_gemma_completes_with_bos_as_llama_cpp(gemma):
    for cid in ("g-code", "g-fact"):
        case = GEMMA[cid]
        r = gemma.completions.create(model="gemma", prompt=case["prompt"], temperature=0, max_tokens=16)
        # The GGUF asks for BOS: the prompt counts it, as llama.cpp's ids do.
        assert r.usage.prompt_tokens == len(case["prompt_ids"])
        assert r.choices[0].text.startswith(decisive(case)), r.choices[0].text


def test_gemma_streams_a_completion(gemma):
    case = GEMMA["g-de"]
    chunks = list(gemma.completions.create(model="gemma", prompt=case["prompt"], temperature=0, max_tokens=12, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith(decisive(case)), text


def test_gemma_chat_is_a_clear_400(gemma):
    with pytest.raises(openai.BadRequestError) as e:
        gemma.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    err = e.value.body
    assert err["param"] == "messages"
    assert "no chat template" in err["message"] and "--chat-template" in err["message"]
