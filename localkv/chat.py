"""`localkv chat`: a terminal conversation over one engine, with slash commands.

The conversation stays in the KV cache between turns: each turn feeds only the
new messages. With a compressing policy the cache is held to the budget, so a
conversation can go on far past the context.
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Callable

from .errors import LocalkvError
from .fsutil import atomic_write

HELP = """commands:
  /help            this list
  /stats           memory of the live conversation
  /policy NAME     switch policy (restarts the conversation's cache)
  /budget N        switch budget (restarts the conversation's cache)
  /reset           forget the conversation
  /save FILE       save the conversation as JSON
  /load FILE       load a conversation saved with /save
  /exit            leave (Ctrl-D too); Ctrl-C stops a reply"""


def conversation_policy_args(policy: str, args: dict[str, str]) -> dict[str, str]:
    """A conversation's earlier turns are compressed before the later questions exist: a policy that can
    replay them (KVzip's reconstruction, `replay=true`) does so unless told otherwise (measured in
    docs/results.md, "KVzip: a chat that remembers": SnapKV keeps no fact of an earlier turn at a third of the
    conversation without it). Used by
    `localkv chat` and by `localkv serve`, whose cached conversations are the same thing."""
    from .policies import available
    cls = available().get(policy)
    if "replay" in getattr(cls, "__dataclass_fields__", {}) and "replay" not in args:
        return {**args, "replay": "true"}
    return args


def chat_policy_args(policy: str, items: list[str] | None) -> list[str]:
    """conversation_policy_args for NAME=VALUE items from the command line."""
    from .policies import parse_args
    return [f"{k}={v}" for k, v in conversation_policy_args(policy, parse_args(items)).items()]


def load_conversation(path: str) -> list[dict]:
    """Messages from a /save file, checked; LocalkvError if unreadable or malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise LocalkvError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LocalkvError(f"{path} is not a saved conversation (invalid JSON: {e})") from None
    msgs = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in msgs):
        raise LocalkvError(f"{path} is not a saved conversation (expected {{\"messages\": [{{role, content}}...]}})")
    return msgs


def save_conversation(path: str, messages: list[dict]) -> None:
    """Write atomically: a failed save never leaves a half-written file in place of a good one."""
    atomic_write(path, lambda f: json.dump({"messages": messages}, f, ensure_ascii=False, indent=2))


class ChatSession:
    def __init__(self, make_engine: Callable[..., object], *, system: str | None, max_tokens: int,
                 temperature: float, seed: int | None, policy: str, budget: int | None, out, err):
        self.make_engine = make_engine
        self.policy, self.budget = policy, budget
        self.system = system
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.out, self.err = out, err
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.engine = make_engine()
        self.interactive = sys.stdin.isatty()
        self._stop = False
        self.last = None

    # -- input

    def read(self) -> str | None:
        try:
            if self.interactive:
                return self.out.input("[bold green]> [/bold green]")
            line = sys.stdin.readline()
            return None if line == "" else line.rstrip("\n")
        except EOFError:
            return None

    # -- one turn

    def reply(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})
        self._stop = False
        old = signal.signal(signal.SIGINT, self._on_sigint) if self.interactive else None
        try:
            res = self.engine.generate(messages=self.messages, max_tokens=self.max_tokens,
                                       temperature=self.temperature, seed=self.seed, keep_history=True,
                                       on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()),
                                       should_stop=lambda: self._stop)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        sys.stdout.write("\n")
        self.messages.append({"role": "assistant", "content": res.text})
        self.last = res
        self.err.print(
            f"[dim][{self.engine.n_past} tokens in conversation, {res.kv_tokens_kept} kept per KV head, "
            f"KV {res.kv_bytes_allocated / 2**20:.1f} MiB vs {res.kv_bytes_full_f16 / 2**20:.1f} MiB full f16, "
            f"{res.decode_tokens_per_s:.1f} tok/s{', stopped' if res.stop_reason == 'interrupted' else ''}][/dim]")

    def _on_sigint(self, *_):
        self._stop = True

    # -- commands

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/help":
            self.out.print(HELP)
        elif cmd == "/reset":
            self.messages = [{"role": "system", "content": self.system}] if self.system else []
            self.engine.reset()
            self.out.print("conversation cleared")
        elif cmd == "/stats":
            rep = self.engine.memory_report(tokens=self.engine.n_past)
            self.out.print(f"policy {rep.policy}, budget {rep.budget}, {self.engine.n_past} tokens in conversation, "
                           f"{self.engine.kv_tokens_kept()} kept per KV head\n"
                           f"KV allocated {rep.kv_bytes_allocated / 2**20:.2f} MiB; full cache for these tokens: "
                           f"f16 {rep.kv_bytes_full_f16 / 2**20:.2f} MiB, q8_0 {rep.kv_bytes_full_q8_0 / 2**20:.2f} MiB, "
                           f"q4_0 {rep.kv_bytes_full_q4_0 / 2**20:.2f} MiB")
        elif cmd in ("/policy", "/budget"):
            self._switch(cmd, arg)
        elif cmd == "/save":
            if not arg:
                raise LocalkvError("usage: /save FILE")
            save_conversation(arg, self.messages)
            self.out.print(f"saved {len(self.messages)} messages to {arg}")
        elif cmd == "/load":
            if not arg:
                raise LocalkvError("usage: /load FILE")
            self.messages = load_conversation(arg)
            self.engine.reset()
            self.out.print(f"loaded {len(self.messages)} messages (they are read again on the next turn)")
        else:
            raise LocalkvError(f"unknown command {cmd}: /help lists them")
        return True

    def _switch(self, cmd: str, arg: str) -> None:
        policy, budget = self.policy, self.budget
        if cmd == "/policy":
            if not arg:
                raise LocalkvError("usage: /policy NAME")
            policy = arg
        else:
            try:
                budget = int(arg)
            except ValueError:
                raise LocalkvError("usage: /budget N (a whole number of tokens)") from None
        engine = self.make_engine(policy=policy, budget=budget if policy != "full" else None)
        self.engine.close()
        self.engine, self.policy, self.budget = engine, policy, budget
        self.out.print(f"policy {policy}, budget {budget}: the conversation is read again on the next turn")

    def run(self) -> None:
        if self.interactive:
            self.err.print("[dim]localkv chat: /help for commands, Ctrl-D to leave[/dim]")
        while True:
            line = self.read()
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        break
                else:
                    self.reply(line)
            except LocalkvError as e:
                if not self.interactive:
                    raise
                self.err.print(f"[red]error:[/red] {e}")
        self.engine.close()
