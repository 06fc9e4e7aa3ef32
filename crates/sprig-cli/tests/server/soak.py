"""Soak test of a running `sprig serve` (crates/sprig-cli/tests/server.rs runs it): REQUESTS requests, CONCURRENT at
a time, every tenth one streamed and dropped after its first pieces of text. Every other request must succeed;
afterwards no request may be left active or queued (the dropped ones were cancelled, not leaked), and the
server's resident memory must not have grown more than 10 % since the first 100 requests.

usage: soak.py BASE_URL API_KEY MODEL SERVER_PID [REQUESTS [CONCURRENT]]
"""

import asyncio
import json
import re
import sys
import time

import httpx2 as httpx  # what openai 3.x installs (the httpx API)

base, key, model, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
REQUESTS = int(sys.argv[5]) if len(sys.argv) > 5 else 1000
CONCURRENT = int(sys.argv[6]) if len(sys.argv) > 6 else 16
headers = {"Authorization": f"Bearer {key}"}
SYSTEM = "You are a helpful in-car assistant. Answer in one short sentence."
TOPICS = ["the weather", "traffic", "music", "fuel", "a song", "the route", "parking", "a podcast"]


def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


failures, dropped, finished = [], 0, 0
rss_after_100 = None


async def one(i, client):
    global dropped
    drop = i % 10 == 5
    stream = drop or i % 2 == 0
    body = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Request {i}: tell me about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": 48 if drop else 8,
        "temperature": 0.7,
        "seed": i,
        "stream": stream,
    }
    url = f"{base}/chat/completions"
    if not stream:
        r = await client.post(url, json=body, headers=headers)
        if r.status_code != 200:
            return f"{i}: HTTP {r.status_code} {r.text[:200]}"
        c = r.json()["choices"][0]
        if c["finish_reason"] not in ("stop", "length") or not isinstance(c["message"]["content"], str):
            return f"{i}: bad reply {c}"
        return None
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            return f"{i}: HTTP {r.status_code}"
        pieces, done, reason = 0, False, None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return f"{i}: error event {chunk}"
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                pieces += 1
                if drop and pieces >= 2:
                    # Leaving the block closes the connection mid-stream.
                    dropped += 1
                    return None
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                reason = chunk["choices"][0]["finish_reason"]
        if not done or reason not in ("stop", "length"):
            return f"{i}: stream ended without [DONE] or a finish reason ({done}, {reason})"
        return None


async def main():
    global finished, rss_after_100
    sem = asyncio.Semaphore(CONCURRENT)
    limits = httpx.Limits(max_connections=CONCURRENT + 4, max_keepalive_connections=CONCURRENT)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def guarded(i):
            global finished, rss_after_100
            async with sem:
                try:
                    err = await one(i, client)
                except Exception as e:  # a transport failure is a failure
                    err = f"{i}: {type(e).__name__}: {e}"
            if err:
                failures.append(err)
            finished += 1
            if finished == 100:
                rss_after_100 = rss_kib()

        t0 = time.time()
        await asyncio.gather(*(guarded(i) for i in range(REQUESTS)))
        secs = time.time() - t0
        # The server notices a dropped stream at its next token: give it a moment to be idle.
        active = queued = None
        for _ in range(100):
            text = (await client.get(f"{base.rsplit('/v1', 1)[0]}/metrics", headers=headers)).text
            active = int(float(re.search(r'sprig_active_requests\{model="[^"]*"\} (\S+)', text).group(1)))
            queued = int(float(re.search(r'sprig_queue_depth\{model="[^"]*"\} (\S+)', text).group(1)))
            if active == 0 and queued == 0:
                break
            await asyncio.sleep(0.1)
        cancelled = int(float(re.search(r'sprig_cancelled_requests_total\{model="[^"]*"\} (\S+)', text).group(1)))
    rss_end = rss_kib()
    print(f"soak: {REQUESTS} requests, {CONCURRENT} concurrent, {secs:.1f} s, {dropped} dropped mid-stream, "
          f"{cancelled} cancelled by the server, {len(failures)} failures, active {active}, queued {queued}, "
          f"RSS after 100 {rss_after_100} KiB, at the end {rss_end} KiB ({rss_end / rss_after_100:.3f}x)")
    ok = True
    if failures:
        print("failures:", *failures[:20], sep="\n  ")
        ok = False
    if active != 0 or queued != 0:
        print(f"leaked: {active} active, {queued} queued")
        ok = False
    if dropped == 0 or cancelled == 0:
        print("no request was dropped mid-stream and cancelled: the test did not test that")
        ok = False
    if rss_end > 1.1 * rss_after_100:
        print("resident memory grew more than 10 %")
        ok = False
    sys.exit(0 if ok else 1)


asyncio.run(main())
