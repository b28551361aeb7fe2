#!/usr/bin/env python3
"""Reference sentence embeddings for all-MiniLM-L6-v2, computed without Wick: the model's own
tokenizer.json through Hugging Face's `tokenizers` (its fixed padding and truncation to 128
turned off: the sentence-transformers limit is max_seq_length, 256), then a plain BERT forward
in numpy float64 over model.safetensors, mean pooling over the tokens and L2 normalization (as
modules.json and 1_Pooling/config.json name them). Writes tests/data/embeddings/minilm.json.

  python -m venv v && v/bin/pip install numpy safetensors tokenizers
  v/bin/python scripts/embedding-reference.py "$(scripts/fetch-model.sh minilm)"
"""
import json
import math
import pathlib
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

INPUTS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello",
    "Retrieval-augmented generation embeds documents into a vector database and chats over "
    "what it retrieves. " * 10,
    "Le café est très chaud ce matin, n'est-ce pas ?",
    "Ich möchte ein Zimmer für zwei Nächte reservieren.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "مرحبا بالعالم",
    "fn main() { println!(\"{}\", 2 + 2); } 🚀🔥",
]


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def forward(w, cfg, ids):
    g = lambda k: w[k].astype(np.float64)
    n = len(ids)
    x = g("embeddings.word_embeddings.weight")[ids] + g("embeddings.position_embeddings.weight")[:n] \
        + g("embeddings.token_type_embeddings.weight")[0]
    eps = cfg["layer_norm_eps"]
    x = layer_norm(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"), eps)
    heads = cfg["num_attention_heads"]
    hd = cfg["hidden_size"] // heads
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        lin = lambda t, name: t @ g(p + name + ".weight").T + g(p + name + ".bias")
        q = lin(x, "attention.self.query").reshape(n, heads, hd).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(n, heads, hd).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(n, heads, hd).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(1, 0, 2).reshape(n, heads * hd)
        x = layer_norm(x + lin(ctx, "attention.output.dense"),
                       g(p + "attention.output.LayerNorm.weight"), g(p + "attention.output.LayerNorm.bias"), eps)
        h = gelu(lin(x, "intermediate.dense"))
        x = layer_norm(x + lin(h, "output.dense"),
                       g(p + "output.LayerNorm.weight"), g(p + "output.LayerNorm.bias"), eps)
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def main():
    model = pathlib.Path(sys.argv[1])
    cfg = json.loads((model / "config.json").read_text())
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    w = load_file(str(model / "model.safetensors"))
    out = {"model": "all-MiniLM-L6-v2", "cases": []}
    for text in INPUTS:
        ids = tok.encode(text).ids
        vec = forward(w, cfg, ids)
        out["cases"].append({"input": text, "token_ids": ids,
                             "embedding": [float(f"{v:.8g}") for v in vec]})
    dest = pathlib.Path(__file__).resolve().parent.parent / "tests/data/embeddings/minilm.json"
    dest.write_text(json.dumps(out, ensure_ascii=False) + "\n")
    print(f"{dest}: {len(INPUTS)} inputs, token counts {[len(c['token_ids']) for c in out['cases']]}")


if __name__ == "__main__":
    main()
