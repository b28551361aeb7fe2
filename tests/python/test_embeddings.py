"""Embeddings through the official openai client's `embeddings.create`, on one server that
serves the default chat model and all-MiniLM-L6-v2 together, against reference vectors
computed without Wick (scripts/embedding-reference.py)."""
import json
import math
import pathlib
import urllib.request

import openai
import pytest

from conftest import MODEL

REFS = json.loads(
    (pathlib.Path(__file__).parents[1] / "data/embeddings/minilm.json").read_text()
)["cases"]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_embeddings_create_matches_the_references(multi, encoding_format):
    # Without encoding_format the client asks for base64 and decodes it itself.
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    r = multi.embeddings.create(model="minilm", input=[c["input"] for c in REFS], **kwargs)
    assert r.model == "minilm"
    assert [d.index for d in r.data] == list(range(len(REFS)))
    assert r.usage.prompt_tokens == sum(len(c["token_ids"]) for c in REFS)
    if encoding_format == "base64":
        # Asked for explicitly, the client hands back the string: 384 little-endian f32.
        import base64
        import struct

        vectors = [list(struct.unpack("<384f", base64.b64decode(d.embedding))) for d in r.data]
    else:
        vectors = [d.embedding for d in r.data]
    for v, c in zip(vectors, REFS):
        assert len(v) == 384
        assert cosine(v, c["embedding"]) >= 0.9999, c["input"]


def test_one_string_and_token_ids(multi):
    one = multi.embeddings.create(model="minilm", input=REFS[2]["input"])
    ids = multi.embeddings.create(model="minilm", input=REFS[2]["token_ids"])
    assert len(one.data) == len(ids.data) == 1
    assert cosine(one.data[0].embedding, REFS[2]["embedding"]) >= 0.9999
    assert cosine(ids.data[0].embedding, REFS[2]["embedding"]) >= 0.9999


def test_chat_and_embeddings_from_one_process(multi, multi_server):
    models = {m.id for m in multi.models.list()}
    assert models == {MODEL, "minilm"}
    # The chat model's own [[models]] entry sized its KV cache (300, not [scheduler]'s 256).
    metrics = urllib.request.urlopen(multi_server + "/metrics").read().decode()
    assert f'wick_kv_cache_blocks{{model="{MODEL}"}} 300' in metrics
    r = multi.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert r.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="not an embedding model"):
        multi.embeddings.create(model=MODEL, input="hello")
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        multi.chat.completions.create(
            model="minilm", messages=[{"role": "user", "content": "Hi"}]
        )
    with pytest.raises(openai.NotFoundError):
        multi.embeddings.create(model="nope", input="hello")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        multi.embeddings.create(model="minilm", input="hello", dimensions=64)
