#!/usr/bin/env python3
"""Records llama.cpp's numerics on a GGUF, through llama-server's HTTP API, in the format of
tests/data's references (see tests/data/reference/README.md).

    scripts/make-reference.py LLAMA_SERVER MODEL.gguf PROMPTS.json OUT.json

LLAMA_SERVER: the binary (scripts/build-llama.sh builds it). PROMPTS.json: {"prompts": [...],
"tokenizer": [strings]}; each prompt has an `id`, a `kind` (`chat` with `messages` and
optionally `tools`, or `completion` with `prompt`) and optionally `max_tokens` (48).

For each prompt: the text after the GGUF's own chat template (llama-server --jinja), llama.cpp's
token ids for it, and greedy decoding with the ten most likely tokens' log-probabilities at
every step (the full softmax of the raw logits); the cut points the checks use (stable_steps:
before the first top-two margin under 0.1 nats; decisive_steps_04: under 0.4) and the text up
to each. Then llama.cpp's ids for each tokenizer string. The server's log goes to OUT.json.log.
"""
import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

PRODUCER = "llama.cpp llama-server (vendored in llama-cpp-python {release}), CPU, greedy, n_probs=10"
TOP = 10


class Server:
    """A llama-server on a free loopback port, one slot, for the life of a `with` block."""

    def __init__(self, binary, model, log):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        args = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", "1",
                "-c", "4096", "-t", str(os.cpu_count() or 2), "--jinja", "--no-webui"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)

    def __enter__(self):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"llama-server exited ({self.proc.returncode}) before it was ready")
            with contextlib.suppress(OSError, urllib.error.HTTPError, ValueError):
                if self.call("/health").get("status") == "ok":
                    return self
            time.sleep(0.3)
        sys.exit("llama-server was not ready in 300 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()

    def call(self, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def tokenize(self, text, special):
        body = {"content": text, "add_special": special, "parse_special": True}
        return self.call("/tokenize", body)["tokens"]

    def detokenize(self, ids):
        return self.call("/detokenize", {"tokens": ids})["content"]


def first_margin_under(steps, nats):
    """Steps before the first whose top two log-probabilities are closer than `nats`."""
    for i, step in enumerate(steps):
        if step["top"][0][1] - step["top"][1][1] < nats:
            return i
    return len(steps)


def record(server, case):
    if case["kind"] == "chat":
        body = {"messages": case["messages"]}
        if case.get("tools"):
            body["tools"] = case["tools"]
        text = server.call("/apply-template", body)["prompt"]
    else:
        text = case["prompt"]
    ids = server.tokenize(text, True)
    # A template that writes BOS itself gets it twice from add_special: keep one.
    bos = server.tokenize("", True)[:1]
    if len(ids) > 1 and ids[0] == ids[1] and ids[:1] == bos:
        ids = ids[1:]
    answer = server.call("/completion", {
        "prompt": ids, "n_predict": case.get("max_tokens", 48), "temperature": 0,
        "n_probs": TOP, "cache_prompt": False, "return_tokens": True,
    })
    steps = [{"id": p["id"], "top": [[t["id"], round(t["logprob"], 5)] for t in p["top_logprobs"]]}
             for p in answer["completion_probabilities"]]
    stable = first_margin_under(steps, 0.1)
    decisive = first_margin_under(steps, 0.4)
    generated = [s["id"] for s in steps]
    return {
        **case,
        "prompt_text": text,
        "prompt_ids": ids,
        "steps": steps,
        "text": answer["content"],
        "stop_type": answer.get("stop_type"),
        "stable_steps": stable,
        "stable_prefix_text": server.detokenize(generated[:stable]),
        "decisive_steps_04": decisive,
        "decisive_prefix_text": server.detokenize(generated[:decisive]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("server")
    ap.add_argument("model")
    ap.add_argument("prompts")
    ap.add_argument("out")
    ap.add_argument("--release", default=os.environ.get("LLAMA_CPP_PYTHON", "0.3.36"),
                    help="the llama-cpp-python release the server was built from (for `producer`)")
    args = ap.parse_args()
    spec = json.loads(pathlib.Path(args.prompts).read_text())
    sha = hashlib.sha256(pathlib.Path(args.model).read_bytes()).hexdigest()
    with open(args.out + ".log", "w") as log, Server(args.server, args.model, log) as server:
        template = server.call("/props").get("chat_template", "")
        cases = []
        for case in spec["prompts"]:
            cases.append(record(server, case))
            c = cases[-1]
            print(f"{c['id']}: {len(c['prompt_ids'])} prompt tokens, {len(c['steps'])} steps, "
                  f"stable {c['stable_steps']}: {c['text'][:60]!r}", file=sys.stderr)
        tokenizer = [{"text": t, "ids": server.tokenize(t, False)} for t in spec.get("tokenizer", [])]
    out = {
        "model": os.path.basename(args.model),
        "model_sha256": sha,
        "producer": PRODUCER.format(release=args.release),
        "chat_template_used": template[:20000],
        "cases": cases,
        "tokenizer": tokenizer,
    }
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    os.remove(args.out + ".log")


if __name__ == "__main__":
    main()
