"""`localkv serve` under load: the real server on a free port, many clients mixing every kind of request.

    python scripts/serve_load.py                  # 32 clients, 60 s (after a short warm-up)
    python scripts/serve_load.py --clients 8 --seconds 10 --json

Good requests (chat, streamed chat, completion, a per-request policy) have answers that can be checked
(greedy "What is 2+2?" contains 4; "1, 2, 3, 4," continues with 5). The rest are malformed JSON, hostile
policy arguments, fields the server does not implement, a wrong API key, an oversized body, a too-long
request, and clients that go away: while queued, during their prompt's prefill (a long prompt, closed once the
stats show it being read) and while their reply streams. It checks that every good request got a correct
answer, every bad one its 4xx, nothing a 5xx, that the server still answers afterwards, and that its RSS at
the end is within --rss-slack MiB of its RSS after the warm-up. Prints the counts and the p50/p95 latency of
the good requests (--json: the same as JSON); exits 1 if a check failed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict

import httpx

KEY = "load-test-key"
QUESTION = "What is 2+2? Answer with a number."
MAX_BODY = 1 << 20

HOSTILE = [  # (localkv object, the argument the 400 must name)
    ({"policy": "pyramidkv", "budget": 28, "policy_args": {"sinks": "-5"}}, "sinks"),
    ({"policy": "pyramidkv", "budget": 128, "policy_args": {"beta": 0}}, "beta"),
    ({"policy": "surfacelogickv", "budget": 128, "policy_args": {"beta": "nan"}}, "beta"),
    ({"policy": "snapkv", "budget": 128, "policy_args": {"window": 1e30}}, "window"),
    ({"policy": "snapkv", "budget": 128, "policy_args": {"kernel": -7}}, "kernel"),
    ({"policy": "h2o", "budget": 128, "policy_args": {"recent_ratio": "inf"}}, "recent_ratio"),
    ({"policy": "ahakv", "budget": 128, "policy_args": {"r": 10 ** 30}}, "r"),
    ({"policy": "pod", "budget": 128, "policy_args": {"profile": "/dev/zero"}}, "profile"),
    ({"policy": "surfacelogickv", "budget": 128, "policy_args": {"profile": "/etc/passwd"}}, "profile"),
    ({"policy": "kvzip", "budget": 128, "policy_args": {"replay_chunk": "lots"}}, "replay_chunk"),
    ({"policy": "pod+snapkv", "budget": 512, "policy_args": {"delta": -1}}, "delta"),
]
UNSUPPORTED = [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"response_format": {"type": "json_object"}},
    {"logprobs": True, "top_logprobs": 3},
    {"n": 2},
    {"frequency_penalty": 1.0},
    {"logit_bias": {"15": 100}},
]
MALFORMED = [b"{not json", b"[1, 2]", b'{"messages": "hi"}', b"", b"\xff\xfe{}", b"[" * 100000,
             b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
             b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
             b'{"messages": [{"role": "wizard", "content": "hi"}]}',
             b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}']
WEIGHTS = {"good_chat": 3, "good_stream": 2, "good_completion": 1, "good_policy": 1, "malformed": 1,
           "hostile_policy_args": 1.5, "unsupported_field": 1, "bad_api_key": 0.5, "oversized_body": 0.2,
           "too_long": 0.4, "disconnect_queued": 0.5, "disconnect_prefill": 0.6, "disconnect_streaming": 0.8}
GOOD = {"good_chat", "good_stream", "good_completion", "good_policy"}


def long_prompt(words: int) -> str:
    tag = uuid.uuid4().hex[:8]  # a conversation no cache holds
    return f"Note {tag}. " + " ".join(f"item{i % 97} is {i % 13}." for i in range(words)) + " Summarize."


class Load:
    def __init__(self, url: str, clients: int, seconds: float):
        self.url, self.clients, self.seconds = url, clients, seconds
        self.auth = {"Authorization": f"Bearer {KEY}"}
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.failures: list[str] = []
        self.statuses: Counter = Counter()

    def fail(self, kind: str, what: str) -> None:
        self.counts[kind]["unexpected"] += 1
        if len(self.failures) < 30:
            self.failures.append(f"{kind}: {what}"[:400])

    def ok(self, kind: str) -> None:
        self.counts[kind]["ok"] += 1

    async def client(self, http: httpx.AsyncClient, rnd: random.Random, until: float) -> None:
        kinds, weights = zip(*WEIGHTS.items())
        while time.monotonic() < until:
            kind = rnd.choices(kinds, weights)[0]
            self.counts[kind]["sent"] += 1
            t0 = time.perf_counter()
            try:
                await getattr(self, kind)(http, rnd)
            except (httpx.HTTPError, OSError, asyncio.TimeoutError) as e:
                self.fail(kind, f"{type(e).__name__}: {e}")
            if kind in GOOD:
                self.latency[kind].append(time.perf_counter() - t0)
            await asyncio.sleep(rnd.uniform(0.05, 0.3))  # a client thinks between requests

    # -- good requests: the answer is checked

    def _status(self, kind: str, r: httpx.Response) -> None:
        self.statuses[r.status_code] += 1

    async def good_chat(self, http, rnd):
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0}
        r = await http.post("/chat/completions", json=body)
        self._status("good_chat", r)
        if r.status_code != 200:
            return self.fail("good_chat", f"{r.status_code} {r.text[:200]}")
        data = r.json()
        text = data["choices"][0]["message"]["content"]
        if "4" not in text or data["choices"][0]["finish_reason"] not in ("stop", "length") or \
                data["usage"]["completion_tokens"] < 1:
            return self.fail("good_chat", f"wrong answer {data}")
        self.ok("good_chat")

    async def good_policy(self, http, rnd):
        extra = rnd.choice([{"policy": "streamingllm", "budget": 64}, {"policy": "h2o", "budget": 128}])
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0,
                "localkv": extra}
        r = await http.post("/chat/completions", json=body)
        self._status("good_policy", r)
        if r.status_code != 200:
            return self.fail("good_policy", f"{r.status_code} {r.text[:200]}")
        data = r.json()
        if "4" not in data["choices"][0]["message"]["content"] or data["usage"]["localkv"]["policy"] != extra["policy"]:
            return self.fail("good_policy", f"wrong answer {data}")
        self.ok("good_policy")

    async def good_completion(self, http, rnd):
        body = {"prompt": "1, 2, 3, 4,", "max_tokens": 6, "temperature": 0}
        r = await http.post("/completions", json=body)
        self._status("good_completion", r)
        if r.status_code != 200:
            return self.fail("good_completion", f"{r.status_code} {r.text[:200]}")
        data = r.json()
        if not data["choices"][0]["text"].startswith(" 5"):
            return self.fail("good_completion", f"wrong continuation {data['choices'][0]}")
        self.ok("good_completion")

    async def good_stream(self, http, rnd):
        usage = rnd.random() < 0.5
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0,
                "stream": True, **({"stream_options": {"include_usage": True}} if usage else {})}
        chunks, done = [], False
        async with http.stream("POST", "/chat/completions", json=body) as r:
            self._status("good_stream", r)
            if r.status_code != 200:
                await r.aread()
                return self.fail("good_stream", f"{r.status_code} {r.text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunks.append(json.loads(line[6:]))
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
        with_usage = [c for c in chunks if "usage" in c]
        right = (done and chunks and chunks[0]["choices"][0]["delta"].get("role") == "assistant" and "4" in text
                 and len(finishes) == 1 and finishes[0] in ("stop", "length")
                 and len(with_usage) == (1 if usage else 0)
                 and (not usage or (chunks[-1] is with_usage[0] and chunks[-1]["choices"] == [])))
        if not right:
            return self.fail("good_stream", f"bad stream: done={done} text={text!r} finishes={finishes} "
                                            f"usage chunks={len(with_usage)} (asked: {usage})")
        self.ok("good_stream")

    # -- bad requests: the right 4xx

    async def _expect(self, kind: str, r: httpx.Response, status: int, words: str = "") -> None:
        self._status(kind, r)
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            return self.fail(kind, f"{r.status_code} not an OpenAI error: {r.text[:200]}")
        if r.status_code != status or words not in json.dumps(err):
            return self.fail(kind, f"{r.status_code} (wanted {status}, '{words}') {err}")
        self.ok(kind)

    async def malformed(self, http, rnd):
        raw = rnd.choice(MALFORMED)
        r = await http.post("/chat/completions", content=raw, headers={"content-type": "application/json"})
        await self._expect("malformed", r, 400)

    async def hostile_policy_args(self, http, rnd):
        extra, arg = rnd.choice(HOSTILE)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "localkv": extra,
                "stream": rnd.random() < 0.5}
        r = await http.post("/chat/completions", json=body)
        await self._expect("hostile_policy_args", r, 400, f"localkv.policy_args.{arg}")

    async def unsupported_field(self, http, rnd):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **rnd.choice(UNSUPPORTED)}
        r = await http.post("/chat/completions", json=body)
        await self._expect("unsupported_field", r, 400, "unsupported_parameter")

    async def bad_api_key(self, http, rnd):
        headers = rnd.choice([{"Authorization": "Bearer wrong"}, {"Authorization": ""}, {"Authorization": KEY}])
        r = await http.post("/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                            headers=headers)
        await self._expect("bad_api_key", r, 401, "invalid_api_key")

    async def oversized_body(self, http, rnd):
        body = json.dumps({"messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}).encode()
        r = await http.post("/chat/completions", content=body, headers={"content-type": "application/json"})
        await self._expect("oversized_body", r, 413, "request_too_large")

    async def too_long(self, http, rnd):
        if rnd.random() < 0.5:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}
            words = "max_tokens"
        else:
            body = {"messages": [{"role": "user", "content": long_prompt(3000)}], "max_tokens": 2,
                    "localkv": {"policy": "full"}}
            words = "context_length_exceeded"
        r = await http.post("/chat/completions", json=body)
        await self._expect("too_long", r, 400, words)

    # -- clients that go away

    async def _raw_post(self, body: dict, path: str = "/v1/chat/completions"):
        host, port = httpx.URL(self.url).host, httpx.URL(self.url).port
        reader, writer = await asyncio.open_connection(host, port)
        data = json.dumps(body).encode()
        writer.write((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data)
        await writer.drain()
        return reader, writer

    async def disconnect_queued(self, http, rnd):
        body = {"messages": [{"role": "user", "content": long_prompt(300)}], "max_tokens": 16}
        _reader, writer = await self._raw_post(body)
        await asyncio.sleep(0.2)
        writer.close()
        self.ok("disconnect_queued")

    async def disconnect_prefill(self, http, rnd):
        """A long prompt, streamed: its id comes with the role chunk; once the stats show the worker reading it,
        the client goes away 0.2 s later."""
        body = {"messages": [{"role": "user", "content": long_prompt(300)}], "max_tokens": 16, "stream": True}
        async with http.stream("POST", "/chat/completions", json=body) as r:
            self._status("disconnect_prefill", r)
            if r.status_code != 200:
                await r.aread()
                return self.fail("disconnect_prefill", f"{r.status_code} {r.text[:200]}")
            lines = r.aiter_lines()
            job = None
            async for line in lines:
                if line.startswith("data: "):
                    job = json.loads(line[6:])["id"]
                    break
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                cur = (await http.get("/localkv/stats")).json()["current"]
                if cur and cur["id"] == job:
                    await asyncio.sleep(0.2)
                    self.counts["disconnect_prefill"]["seen_reading"] += 1
                    break
                await asyncio.sleep(0.1)
        self.ok("disconnect_prefill")  # closed here, whatever the worker was doing

    async def disconnect_streaming(self, http, rnd):
        body = {"messages": [{"role": "user", "content": "Write a long story about the sea."}], "max_tokens": 64,
                "stream": True, "temperature": 0.7, "localkv": {"ignore_eos": True}}
        got = 0
        async with http.stream("POST", "/chat/completions", json=body) as r:
            self._status("disconnect_streaming", r)
            if r.status_code != 200:
                await r.aread()
                return self.fail("disconnect_streaming", f"{r.status_code} {r.text[:200]}")
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    got += 1
                    if got >= 3:
                        break
        self.ok("disconnect_streaming")

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients * 3, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.url, headers=self.auth, timeout=300, limits=limits) as http:
            until = time.monotonic() + self.seconds
            await asyncio.gather(*(self.client(http, random.Random(i), until) for i in range(self.clients)))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(args, stderr) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "localkv.cli", "serve", "--port", "0", "--policy", args.policy, "--budget",
           str(args.budget), "--ctx", str(args.ctx), "--threads", str(args.threads), "--queue", str(args.queue),
           "--max-tokens", "32", "--api-key", KEY, "--max-body", str(MAX_BODY), "--pool", str(args.pool)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line = proc.stdout.readline() if sel.select(180) else ""
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split()[2]


def wait_idle(url: str, timeout: float = 120) -> dict:
    t0 = time.monotonic()
    while True:
        h = httpx.get(url.rsplit("/v1", 1)[0] + "/health", timeout=30).json()
        if (h["queue"] == 0 and not h["busy"]) or time.monotonic() - t0 > timeout:
            return h
        time.sleep(0.2)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=10, help="seconds of the same mix before the RSS baseline")
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--queue", type=int, default=64, help="the server's --queue (above the clients: no 503)")
    ap.add_argument("--rss-slack", type=float, default=50, help="MiB the RSS may differ from after warm-up")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--json-out", help="also write the JSON result to this file")
    args = ap.parse_args()

    stderr = tempfile.TemporaryFile(mode="w+")
    proc, url = start_server(args, stderr)
    result: dict = {"clients": args.clients, "seconds": args.seconds, "policy": args.policy, "budget": args.budget,
                    "ctx": args.ctx, "threads": args.threads}
    problems: list[str] = []
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        if args.warmup > 0:
            asyncio.run(Load(url, args.clients, args.warmup).run())
        wait_idle(url)
        rss_warm = rss_mib(proc.pid)
        load = Load(url, args.clients, args.seconds)
        series: list[float] = []
        sampling = threading.Event()

        def sample() -> None:  # the RSS every 5 s while the load runs: a leak grows, a warm heap levels off
            while not sampling.wait(5):
                series.append(round(rss_mib(proc.pid), 1))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        asyncio.run(load.run())
        wall = time.perf_counter() - t0
        sampling.set()
        sampler.join()
        health = wait_idle(url)
        # still answers, correctly
        r = httpx.post(url + "/chat/completions", headers=auth, timeout=120,
                       json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0})
        after_ok = r.status_code == 200 and "4" in r.json()["choices"][0]["message"]["content"]
        stats = httpx.get(url + "/localkv/stats", headers=auth, timeout=30).json()
        rss_end = rss_mib(proc.pid)
        good = [x for k in GOOD for x in load.latency[k]]
        result.update({
            "wall_s": round(wall, 1),
            "counts": {k: dict(v) for k, v in sorted(load.counts.items())},
            "requests": sum(v["sent"] for v in load.counts.values()),
            "statuses": {str(k): v for k, v in sorted(load.statuses.items())},
            "good_latency_s": {"n": len(good), "p50": round(pct(good, 50), 2), "p95": round(pct(good, 95), 2),
                               "mean": round(statistics.fmean(good), 2) if good else None},
            "server_cancelled": stats["cancelled"], "server_served": stats["requests_served"],
            "queue_after": health["queue"], "busy_after": health["busy"], "answers_after": after_ok,
            "rss_mib_after_warmup": round(rss_warm, 1), "rss_mib_end": round(rss_end, 1),
            "rss_delta_mib": round(rss_end - rss_warm, 1), "rss_every_5s_mib": series, "failures": load.failures,
            "slowest_recent": sorted(stats["recent"], key=lambda r: -r["seconds"])[:5],
        })
        for kind, c in load.counts.items():
            if c["unexpected"]:
                problems.append(f"{c['unexpected']} unexpected outcomes of {kind}")
            if kind in GOOD and c["ok"] != c["sent"]:
                problems.append(f"{kind}: {c['ok']} of {c['sent']} answered correctly")
        fives = {k: v for k, v in load.statuses.items() if k >= 500}
        if fives:
            problems.append(f"5xx answers: {fives}")
        if not after_ok:
            problems.append("the server did not answer correctly afterwards")
        if health["queue"] or health["busy"]:
            problems.append(f"the server is not idle afterwards: {health}")
        if abs(rss_end - rss_warm) > args.rss_slack:
            problems.append(f"RSS moved {rss_end - rss_warm:+.1f} MiB (more than {args.rss_slack})")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr.seek(0)
        log = stderr.read()
        if "Traceback" in log or "internal error" in log:
            problems.append("the server logged an error: " + log[-2000:])
        result["exit_code"] = proc.returncode
    result["problems"] = problems
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.clients} clients, {result['wall_s']} s, {result['requests']} requests "
              f"({args.policy} budget {args.budget}, --ctx {args.ctx}, {args.threads} threads)")
        print(f"{'kind':22} {'sent':>6} {'ok':>6} {'unexpected':>10}")
        for kind, c in result["counts"].items():
            print(f"{kind:22} {c.get('sent', 0):>6} {c.get('ok', 0):>6} {c.get('unexpected', 0):>10}")
        lat = result["good_latency_s"]
        print(f"good requests: {lat['n']}, latency p50 {lat['p50']} s, p95 {lat['p95']} s")
        print(f"HTTP statuses: {result['statuses']}")
        print(f"server: served {result['server_served']}, cancelled {result['server_cancelled']}; "
              f"afterwards queue {result['queue_after']}, busy {result['busy_after']}, "
              f"answers correctly: {result['answers_after']}")
        print(f"RSS: {result['rss_mib_after_warmup']} MiB after warm-up, {result['rss_mib_end']} MiB at the end "
              f"({result['rss_delta_mib']:+} MiB); every 5 s under load: {' '.join(map(str, series))}")
        for f in result["failures"][:10]:
            print("  failure:", f)
        print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
