#!/usr/bin/env python3
"""Batch invariance on a running server (standard library only, for the GPU machine).

Each of N greedy completions alone, one at a time, then all N at once; a request passes when
its text together equals its text alone (the same ids give the same text). Prints a JSON
summary; exit 1 unless all N pass.
"""
import argparse
import concurrent.futures as cf
import json
import sys
import urllib.request

BASE = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
    "In 1969, the first humans to walk on the Moon",
    "A good recipe for pancakes starts with",
    "Photosynthesis is the process by which",
]


def complete(url, model, prompt, max_tokens):
    body = json.dumps({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["choices"][0]["text"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:18080")
    ap.add_argument("--model", default="gpu-check")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    prompts = [f"{BASE[i % len(BASE)]} ({i})" for i in range(a.requests)]
    alone = [complete(a.url, a.model, p, a.max_tokens) for p in prompts]
    with cf.ThreadPoolExecutor(a.requests) as ex:
        together = list(ex.map(lambda p: complete(a.url, a.model, p, a.max_tokens), prompts))
    same = sum(x == y for x, y in zip(alone, together))
    differ = [i for i, (x, y) in enumerate(zip(alone, together)) if x != y]
    print(json.dumps({"requests": a.requests, "identical": same, "differ": differ[:8]}))
    return 0 if same == a.requests else 1


if __name__ == "__main__":
    sys.exit(main())
