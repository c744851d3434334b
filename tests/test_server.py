"""`localkv serve` as an OpenAI client sees it: the real server on a free port, the official `openai` client.

The request checks and the stop-sequence filter are also tested directly (no model needed).
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from localkv.serve import CacheKey, RequestError, StopFilter, cache_key, parse_request

MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
BUDGET = 128
POOL = 3
CTX = 512
DEFAULT = CacheKey("snapkv", BUDGET)


# ------------------------------------------------------------ without a model


def test_stop_filter_cuts_at_the_first_stop_across_pieces():
    f = StopFilter(["END", "\n\n"])
    out = [f.push(p) for p in ["Hello E", "N", "d? ", "EN", "D tail"]]
    assert "".join(out) == "Hello ENd? " and f.hit
    assert out[:3] == ["Hello ", "", "ENd? "]  # "E", then "EN", held back: they may start "END"
    assert f.push("more") == "" and f.flush() == ""
    f = StopFilter(["\n\n"])
    assert f.push("a\n") == "a" and f.push("b") == "\nb" and f.flush() == "" and not f.hit
    f = StopFilter(["xyz"])
    assert f.push("ab") == "ab" and f.push("xy") == "" and f.flush() == "xy"
    f = StopFilter(["bc", "xa"])  # the earliest match wins, whatever the order of the list
    assert f.push("xxabc") == "x" and f.hit
    f = StopFilter([])
    assert f.push("any") == "any" and f.flush() == ""


def _chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}


def test_parse_chat_request_fields_and_defaults():
    req = parse_request(_chat(max_tokens=7, temperature=0, seed=3, stop="\n", stream=True,
                              stream_options={"include_usage": True}), "chat", DEFAULT, MODEL, 99)
    assert (req.max_tokens, req.temperature, req.seed, req.stop, req.stream, req.include_usage) == (7, 0.0, 3, ["\n"],
                                                                                                   True, True)
    assert req.key == DEFAULT and not req.ignore_eos
    req = parse_request({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]}]},
                        "chat", DEFAULT, MODEL, 99)
    assert req.messages == [{"role": "system", "content": "ab"}] and req.max_tokens == 99
    req = parse_request({"model": MODEL, "prompt": ["def f():"], "max_tokens": 5}, "completion", DEFAULT, MODEL, 9)
    assert req.prompt == "def f():" and req.messages is None


@pytest.mark.parametrize("body, words", [
    ([1, 2], "JSON object"),
    (_chat(model="gpt-4o"), "does not exist"),
    ({"model": MODEL, "messages": []}, "non-empty list"),
    (_chat(messages=[{"role": "wizard", "content": "x"}]), "needs a role"),
    (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "only text"),
    (_chat(max_tokens=0), "'max_tokens' must be at least 1"),
    (_chat(max_tokens="ten"), "must be an integer"),
    (_chat(temperature=3), "from 0 to 2"),
    (_chat(seed=1.5), "'seed' must be an integer"),
    (_chat(stop=[""]), "'stop'"),
    (_chat(n=2), "'n' must be 1"),
    (_chat(stream="yes"), "'stream'"),
    (_chat(localkv={"polcy": "h2o"}), "no field 'polcy'"),
    (_chat(localkv={"policy": "magic"}), "unknown policy 'magic'"),
    (_chat(localkv={"budget": "big"}), "'localkv.budget' must be an integer"),
    (_chat(localkv={"budget": 0}), "'localkv.budget' must be at least 1"),
    (_chat(localkv={"policy": "ahakv", "budget": 8}), "smaller than"),
    (_chat(localkv={"policy": "full", "budget": 64}), "keeps everything"),
    (_chat(localkv={"policy_args": {"nope": 1}}), "no argument 'nope'"),
    (_chat(localkv={"prefill_budget": 64}), "smaller than the budget"),
])
def test_bad_requests_are_refused_with_a_reason(body, words):
    with pytest.raises(RequestError) as e:
        parse_request(body, "chat", DEFAULT, MODEL, 16)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert 400 <= e.value.status < 500 and e.value.body()["error"]["type"] == "invalid_request_error"


def test_per_request_cache_key_over_the_server_defaults():
    base = CacheKey("snapkv", 256, (("window", "16"),), None)
    assert cache_key(None, base) == (base, False)
    assert cache_key({"budget": 64}, base)[0] == CacheKey("snapkv", 64, (("window", "16"),), None)
    # another policy does not inherit the server policy's arguments, but does inherit its budget
    assert cache_key({"policy": "h2o"}, base)[0] == CacheKey("h2o", 256, (), None)
    assert cache_key({"policy": "full"}, base)[0] == CacheKey("full", None, (), None)
    key, ignore = cache_key({"policy_args": {"whole_words": False, "window": 8}, "ignore_eos": True}, base)
    assert key.policy_args == (("whole_words", "false"), ("window", "8")) and ignore
    with pytest.raises(RequestError, match="needs a budget"):
        cache_key({"policy": "snapkv"}, CacheKey("full", None))


def test_missing_serve_extra_is_one_line_naming_it():
    code = ("import sys; sys.modules['sse_starlette'] = None; sys.argv = ['localkv', 'serve']; "
            "from localkv.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'serve' extra" in lines[0] and "pip install" in lines[0], p.stderr


def test_missing_model_file_is_one_line():
    p = subprocess.run([sys.executable, "-m", "localkv.cli", "serve", "--model", "/nonexistent/m.gguf"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error:") and "does not exist" in p.stderr and len(p.stderr.splitlines()) == 1


# ------------------------------------------------------------ the real server


class Served:
    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "localkv.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self._first_line(120)
        if "http://" not in line:
            self.stop()
            raise AssertionError(f"the server did not start: {line!r} {self.proc.stderr.read()}")
        self.url = line.split()[2]

    def _first_line(self, timeout: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
        return self.proc.stdout.readline()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=120, **kw)

    def stats(self) -> dict:
        import httpx
        return httpx.get(self.url + "/localkv/stats", timeout=30).json()


@pytest.fixture(scope="module")
def server():
    s = Served("--policy", "snapkv", "--budget", str(BUDGET), "--pool", str(POOL), "--ctx", str(CTX),
               "--threads", "2", "--max-tokens", "24")
    yield s
    s.stop()
    assert s.proc.returncode is not None


def _localkv(usage) -> dict:
    return usage.model_extra["localkv"]


@pytest.mark.model
def test_models_lists_the_served_model(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL


@pytest.mark.model
def test_chat_streaming_matches_non_streaming(server):
    from localkv import gguf_info, models
    client = server.client()
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    assert "Paris" in text and full.choices[0].finish_reason in ("stop", "length")
    u = full.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 16 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    kv = _localkv(u)
    assert kv["policy"] == "snapkv" and kv["budget"] == BUDGET and not kv["cache_reused"]
    # llama.cpp's own figure for the cache: what the prompt kept plus one decode interval, as `models info` says
    # (the reply's tokens fit in that interval)
    assert kv["kv_bytes_allocated"] == gguf_info.read(models.resolve(None)).compressed_bytes(BUDGET, tokens=u.prompt_tokens)

    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 3 and "".join(deltas) == text  # greedy: the same reply, token by token
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens


@pytest.mark.model
def test_three_turn_conversation_feeds_only_the_new_tokens(server):
    client = server.client()
    msgs = [{"role": "user", "content": "My name is Ada. Say hello to me in one short sentence."}]
    held = None
    for turn, question in enumerate([None, "What is my name?", "Thanks. Now say goodbye to me by name."]):
        if question:
            msgs.append({"role": "user", "content": question})
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
        reply = r.choices[0].message.content
        kv = _localkv(r.usage)
        if turn == 0:
            assert not kv["cache_reused"] and kv["prompt_tokens_fed"] == r.usage.prompt_tokens
        else:
            # the cache held the conversation so far; only the new turn was fed
            assert kv["cache_reused"], kv
            assert 0 < kv["prompt_tokens_fed"] < r.usage.prompt_tokens / 2
            assert abs(held + kv["prompt_tokens_fed"] - r.usage.prompt_tokens) <= 2, (held, kv, r.usage)
        if turn == 1:
            assert "Ada" in reply
        held = kv["conversation_tokens"]
        msgs.append({"role": "assistant", "content": reply})
    stats = server.stats()
    assert any(c["conversation_tokens"] == held for c in stats["conversations"])


@pytest.mark.model
def test_per_request_policy_and_budget(server):
    client = server.client()
    msgs = [{"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0,
                                       extra_body={"localkv": {"policy": "streamingllm", "budget": 64}})
    kv = _localkv(r.usage)
    assert (kv["policy"], kv["budget"]) == ("streamingllm", 64)
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0,
                                        extra_body={"localkv": {"policy": "full"}})
    kv2 = _localkv(r2.usage)
    assert kv2["policy"] == "full" and kv2["budget"] is None
    per_token = kv2["kv_bytes_allocated"] // CTX  # the full cache holds --ctx tokens
    # the compressed cache holds the short prompt plus one decode interval, padded to 32 slots
    assert kv["kv_bytes_allocated"] == per_token * (-(-(r.usage.prompt_tokens + 32) // 32) * 32) < kv2["kv_bytes_allocated"]
    policies = {(c["policy"], c["budget"]) for c in server.stats()["conversations"]}
    assert {("streamingllm", 64), ("full", None)} <= policies


@pytest.mark.model
def test_completions_with_stop_sequences(server):
    client = server.client()
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 7"])
    text = r.choices[0].text
    assert " 5" in text and " 7" not in text and r.choices[0].finish_reason == "stop"
    assert _localkv(r.usage)["prompt_tokens_fed"] == r.usage.prompt_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 7"], stream=True) if c.choices)
    assert streamed == text


@pytest.mark.model
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server):
    import httpx
    import openai
    client = server.client()
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(server.url + "/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/chat/completions", timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    cases = [
        ({"policy": "magic", "budget": 64}, "unknown policy"),
        ({"policy": "snapkv", "budget": 100000}, "larger than the context"),
        ({"policy": "ahakv", "budget": 8}, "smaller than"),
        ({"prefill_budget": 10**9}, "larger than the context"),
    ]
    for extra, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, extra_body={"localkv": extra})
        assert e.value.status_code == 400 and words in e.value.message
    before = {(c["policy"], c["budget"], c["conversation_tokens"]) for c in server.stats()["conversations"]}
    long = [{"role": "user", "content": "word " * (CTX + 100)}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=2, extra_body={"localkv": {"policy": "full"}})
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=msgs, max_tokens=2)
    # refused requests took no conversation's cache
    assert {(c["policy"], c["budget"], c["conversation_tokens"]) for c in server.stats()["conversations"]} == before
    assert server.proc.poll() is None
    ok = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1


@pytest.mark.model
def test_client_that_disconnects_stops_its_generation(server):
    client = server.client()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a very long story about the sea."}],
        max_tokens=400, temperature=0, stream=True, extra_body={"localkv": {"ignore_eos": True}})
    got = []
    for chunk in stream:
        got.append(chunk)
        if len(got) >= 4:
            break
    job = got[0].id
    stream.close()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        rec = [r for r in server.stats()["recent"] if r["id"] == job]
        if rec:
            break
        time.sleep(0.2)
    assert rec and rec[0]["finish_reason"] == "cancelled", rec
    assert rec[0]["completion_tokens"] < 200  # 400 asked for, ignoring end-of-sequence
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.usage.completion_tokens >= 1


@pytest.mark.model
def test_burst_of_concurrent_requests_all_complete_and_the_pool_stays_bounded(server):
    client = server.client()
    served = server.stats()["requests_served"]
    results, errors = {}, []

    def ask(i):
        try:
            r = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": f"Say the number {i}."}])
            results[i] = r
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and sorted(results) == list(range(6))
    assert all(r.choices[0].message.content for r in results.values())
    stats = server.stats()
    assert stats["requests_served"] == served + 6 and stats["requests_queued"] == 0
    assert 1 <= len(stats["conversations"]) <= POOL
    assert stats["kv_bytes_allocated"] == sum(c["kv_bytes_allocated"] for c in stats["conversations"]) > 0


@pytest.mark.model
def test_least_recently_used_conversation_is_evicted(server):
    client = server.client()
    convs = [[{"role": "user", "content": f"Remember the word {w}. Reply OK."}] for w in
             ("apple", "river", "stone", "cloud")]
    for msgs in convs:  # four conversations through a pool of three: the first is evicted
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, temperature=0)
        msgs.append({"role": "assistant", "content": r.choices[0].message.content})
        msgs.append({"role": "user", "content": "Which word?"})
    last = client.chat.completions.create(model=MODEL, messages=convs[-1], max_tokens=3, temperature=0)
    first = client.chat.completions.create(model=MODEL, messages=convs[0], max_tokens=3, temperature=0)
    assert _localkv(last.usage)["cache_reused"] and not _localkv(first.usage)["cache_reused"]
    assert _localkv(first.usage)["prompt_tokens_fed"] == first.usage.prompt_tokens


@pytest.mark.model
def test_serve_refuses_a_busy_port_and_a_policy_without_budget():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        p = subprocess.run([sys.executable, "-m", "localkv.cli", "serve", "--port", str(busy.getsockname()[1])],
                           capture_output=True, text=True, timeout=120)
    finally:
        busy.close()
    assert p.returncode != 0 and "Traceback" not in p.stderr and "choose another --port" in p.stderr
    p = subprocess.run([sys.executable, "-m", "localkv.cli", "serve", "--port", "0", "--policy", "snapkv"],
                       capture_output=True, text=True, timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode != 0 and len(lines) == 1 and "needs --budget" in lines[0], p.stderr


@pytest.mark.model
def test_pool_caches_share_one_loaded_model():
    """Every conversation cache is a context on the server's one model, not another copy of the weights."""
    from localkv.serve import Server
    srv = Server(None, policy="snapkv", budget=BUDGET, ctx=CTX, threads=2, pool_size=2)
    try:
        srv.warm()
        other = CacheKey("h2o", BUDGET)
        srv.worker.submit(srv.pool.acquire, other, "").result()
        engines = [s.engine for s in srv.pool.slots]
        assert len(engines) == 2 and engines[0].model is engines[1].model
        assert engines[0].ctx != engines[1].ctx
        # a cached conversation is a chat: its earlier turns are replayed (as `localkv chat` does)
        assert engines[0].policy.replay and engines[1].policy.replay
    finally:
        srv.close()
    assert all(e.model is None for e in engines)  # closed with the server, the shared model last
