#!/usr/bin/env python3
"""Load test of an OpenAI-compatible server (`sprig serve`, or llama.cpp's `llama-server` for comparison): for each
number of concurrent clients, every client sends streamed chat requests one after another; reports aggregate
generated tokens/s and the time to first token (p50, p95) as the clients see them. Standard library only.

usage: bench-serve.py BASE_URL MODEL [--clients 1,4,16] [--requests-per-client 8] [--max-tokens 64] [--api-key K]
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

TOPICS = ["the weather", "traffic on the ring road", "a jazz playlist", "charging the car", "a quiet route home",
          "parking near the station", "a podcast about history", "the next service stop"]


def one(url, model, i, max_tokens, key):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {
        "model": model,
        "messages": [{"role": "system", "content": "You are a helpful in-car assistant."},
                     {"role": "user", "content": f"Tell me something about {TOPICS[i % len(TOPICS)]} (request {i})."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    t0 = time.perf_counter()
    conn.request("POST", u.path.rstrip("/") + "/chat/completions", json.dumps(body), headers)
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    ttft, pieces, usage = None, 0, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            pieces += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
    conn.close()
    return ttft if ttft is not None else time.perf_counter() - t0, usage if usage is not None else pieces


def level(url, model, clients, per_client, max_tokens, key):
    ttfts, tokens, errors = [], [0], []
    lock = threading.Lock()

    def client(c):
        for k in range(per_client):
            try:
                t, n = one(url, model, c * per_client + k, max_tokens, key)
            except Exception as e:  # reported, not fatal
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                ttfts.append(t)
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    ttfts.sort()
    p = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] * 1000 if ttfts else float("nan")
    return {"clients": clients, "requests": len(ttfts), "errors": len(errors), "secs": round(secs, 2),
            "tokens": tokens[0], "tok_s": round(tokens[0] / secs, 1), "ttft_p50_ms": round(p(0.5)),
            "ttft_p95_ms": round(p(0.95)), "ttft_mean_ms": round(statistics.mean(ttfts) * 1000) if ttfts else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key")
    a = ap.parse_args()
    one(a.url, a.model, 0, 4, a.api_key)  # warm-up
    for c in map(int, a.clients.split(",")):
        print(json.dumps(level(a.url, a.model, c, a.requests_per_client, a.max_tokens, a.api_key)), flush=True)


main()
