"""The OpenAI server (python -m ostquant_vllm.serve) on 127.0.0.1: completions, chat, streaming,
64 concurrent requests with zero errors and outputs identical to sequential ones (greedy)."""
import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
requests = pytest.importorskip("requests")

from conftest import REAL_TEXT_PROMPTS, free_port  # noqa: E402

from ostquant_vllm.serve import stop_server, wait_healthy  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_ckpts, tmp_path_factory):
    ckpt = tiny_ckpts["w4a4kv4"]
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    # no --quantization: serve.py adds it for an ostquant folder
    proc = subprocess.Popen([sys.executable, "-m", "ostquant_vllm.serve", ckpt, "--host", "127.0.0.1", "--port",
                             str(port), "--enforce-eager", "--dtype", "float32", "--max-model-len", "512",
                             "--max-num-seqs", "64", "--served-model-name", "tiny"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, 300, log.name)
        yield base
    finally:
        stop_server(proc)
        log.close()


def complete(base, prompt, n=16):
    r = requests.post(base + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": n,
                                                      "temperature": 0, "ignore_eos": True}, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def test_completion_and_model_list(server):
    assert requests.get(server + "/v1/models", timeout=10).json()["data"][0]["id"] == "tiny"
    text = complete(server, "The capital of France is")
    assert isinstance(text, str) and len(text) > 0


def test_chat(server):
    r = requests.post(server + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 12, "temperature": 0}, timeout=300)
    r.raise_for_status()
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and len(msg["content"]) > 0


def _stream(server, path, payload):
    chunks = []
    with requests.post(server + path, json={**payload, "stream": True}, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line or not line.startswith(b"data: "):
                continue
            data = line[len(b"data: "):]
            if data == b"[DONE]":
                break
            chunks.append(json.loads(data))
    return chunks


def test_streaming_matches_non_streaming(server):
    prompt = "Water boils at 100 degrees Celsius because"
    chunks = _stream(server, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 16,
                                                 "temperature": 0, "ignore_eos": True})
    assert len(chunks) > 1
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == complete(server, prompt)
    chat = _stream(server, "/v1/chat/completions", {"model": "tiny", "max_tokens": 8, "temperature": 0,
                                                    "messages": [{"role": "user", "content": "Hi!"}]})
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chat if c["choices"])
    assert len(chat) > 1 and len(text) > 0


def test_64_concurrent_equal_sequential(server):
    prompts = [REAL_TEXT_PROMPTS[i % len(REAL_TEXT_PROMPTS)] + f" ({i})" for i in range(64)]
    sequential = [complete(server, p) for p in prompts[:16]]
    with concurrent.futures.ThreadPoolExecutor(64) as ex:
        futures = [ex.submit(complete, server, p) for p in prompts]
        results = [f.result() for f in futures]  # raises on any HTTP error
    assert len(results) == 64
    assert results[:16] == sequential
    again = [complete(server, p) for p in prompts[16:24]]
    assert results[16:24] == again
