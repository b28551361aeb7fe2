"""Starts the real `wick` binary on the default model for the openai-client suite.

WICK_BIN (default target/release/wick) and WICK_MODEL (the GGUF) come from
scripts/python-tests.sh. One server, with an API key, serves the whole session.
"""
import json
import os
import socket
import subprocess
import time
import urllib.request

import openai
import pytest

API_KEY = "test-key-123"
MODEL = "smollm2"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model, name, *extra):
    """Starts `wick serve` on `model` as `name`; yields its base URL once healthy."""
    yield from _serve_models([(model, name)], *extra)


def _serve_models(models, *extra):
    """Starts one `wick serve` on every (path, name) of `models`; yields its base URL."""
    flags = [f for path, name in models for f in ("--model", path)]
    flags += [f for path, name in models for f in ("--served-model-name", name)]
    yield from _launch([*flags, *extra])


def _launch(args, env=None):
    """Starts `wick serve ARGS` with the API key on a free port; yields its base URL once
    healthy."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            os.environ.get("WICK_BIN", "target/release/wick"),
            "serve",
            *args,
            "--port", str(port),
            "--api-key", API_KEY,
        ],
        env={**(os.environ if env is None else env), "RUST_LOG": "warn"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, "wick exited during start-up"
        try:
            with urllib.request.urlopen(base + "/health") as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        assert time.time() < deadline, "wick did not become healthy"
        time.sleep(0.1)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def server():
    yield from _serve(os.environ["WICK_MODEL"], MODEL)


@pytest.fixture(scope="session")
def multi_server(tmp_path_factory):
    """The default chat model and all-MiniLM-L6-v2 (WICK_EMBED_MODEL) in one process, from
    a config file's [[models]] (WICK_MODEL, which would replace them, left out)."""
    config = tmp_path_factory.mktemp("multi") / "wick.toml"
    config.write_text(
        "[scheduler]\nkv_cache_blocks = 256\n"
        f"[[models]]\npath = {json.dumps(os.environ['WICK_MODEL'])}\n"
        f"served_model_name = {json.dumps(MODEL)}\nkv_cache_blocks = 300\n"
        f"[[models]]\npath = {json.dumps(os.environ['WICK_EMBED_MODEL'])}\n"
        'served_model_name = "minilm"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "WICK_MODEL"}
    yield from _launch(["--config", str(config)], env)


@pytest.fixture(scope="session")
def multi(multi_server):
    return openai.OpenAI(base_url=multi_server + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def qwen_server():
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (WICK_QWEN_MODEL), with a small KV cache."""
    yield from _serve(os.environ["WICK_QWEN_MODEL"], "qwen", "--kv-cache-blocks", "256")


@pytest.fixture(scope="session")
def gemma_server():
    """Gemma 3 270M Q4_K_M (WICK_GEMMA_MODEL): a base model without a chat template."""
    yield from _serve(os.environ["WICK_GEMMA_MODEL"], "gemma", "--kv-cache-blocks", "256")


@pytest.fixture(scope="session")
def qwen(qwen_server):
    return openai.OpenAI(base_url=qwen_server + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def gemma(gemma_server):
    return openai.OpenAI(base_url=gemma_server + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="session")
def qwen_anthropic(qwen_server):
    """The official anthropic client on the Qwen server (it sends the key as x-api-key)."""
    import anthropic

    return anthropic.Anthropic(base_url=qwen_server, api_key=API_KEY, max_retries=0)
