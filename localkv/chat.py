"""`localkv chat`: a terminal conversation over one engine, with slash commands.

The conversation stays in the KV cache between turns: each turn feeds only the
new messages. With a compressing policy the cache is held to the budget, so a
conversation can go on far past the context.

On a terminal, input comes from prompt_toolkit: line editing, history kept
across sessions, Ctrl-R; a paste (bracketed paste) is one turn however many
lines it has; Alt-Enter (or Esc then Enter) starts a new line; a turn written
between two lines of triple quotes spans several lines, as in Ollama. From a
pipe, every line is one turn (the same triple quotes join lines into one).
Ctrl-C stops the turn being read or answered and rolls it back: the cache and
the history agree, and the next turn goes on from the one before it.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from rich.markup import escape

from .errors import Interrupted, LocalkvError
from .fsutil import atomic_write

HELP = """commands:
  /help                 this list
  /file PATH [QUESTION] send a text file as the turn (the question, if any, after it)
  /stats                memory of the live conversation
  /policy NAME          switch policy (restarts the conversation's cache)
  /budget N             switch budget (restarts the conversation's cache)
  /reset                forget the conversation
  /save FILE            save the conversation as JSON
  /load FILE            load a conversation saved with /save
  /exit                 leave (Ctrl-D too)
keys: Enter sends; Alt-Enter or Esc Enter adds a line; a paste is one turn; \"\"\" opens and closes a
multi-line turn; Up/Down and Ctrl-R search the history; Ctrl-C stops a turn (it is rolled back) or,
at an empty prompt, leaves (unsaved turns are saved first, and the file named)"""

FENCE = '"""'
MAX_FILE_BYTES = 4 << 20  # /file: a text document, not a data dump


def state_dir() -> Path:
    """Where the chat keeps its input history and the conversations it saves on leaving:
    $LOCALKV_STATE, else $XDG_STATE_HOME/localkv, else ~/.local/state/localkv."""
    if os.environ.get("LOCALKV_STATE"):
        return Path(os.environ["LOCALKV_STATE"])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "localkv"


def load_conversation(path: str) -> list[dict]:
    """Messages from a /save file, checked; LocalkvError if unreadable or malformed."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
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
    try:
        atomic_write(Path(path).expanduser(), lambda f: json.dump({"messages": messages}, f, ensure_ascii=False,
                                                                  indent=2))
    except OSError as e:
        raise LocalkvError(f"cannot save to {path}: {e.strerror or e}") from None


def read_text_file(path: str) -> str:
    """A UTF-8 text file for /file, or one line saying why not."""
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            raise LocalkvError(f"{path} is a directory, not a text file")
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise LocalkvError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise LocalkvError(f"{path} is larger than {MAX_FILE_BYTES >> 20} MiB: /file takes a text document")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LocalkvError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if "\x00" in text:
        raise LocalkvError(f"{path} is not a text file (it holds NUL bytes)")
    if not text.strip():
        raise LocalkvError(f"{path} is empty")
    return text


def file_turn(arg: str) -> tuple[str, str]:
    """`/file PATH [QUESTION]` -> (path, the turn's text: the file, then the question). A path with spaces is
    quoted."""
    arg = arg.strip()
    if not arg:
        raise LocalkvError("usage: /file PATH [QUESTION]")
    if arg[0] in "'\"":
        try:
            lex = shlex.shlex(arg, posix=True)
            lex.whitespace_split = True
            path = next(iter(lex))
        except ValueError:
            raise LocalkvError("usage: /file PATH [QUESTION] (the quoted path is not closed)") from None
        question = lex.instream.read().strip()
    else:
        path, _, question = arg.partition(" ")
        question = question.strip()
    text = read_text_file(path).rstrip()
    return path, f"{text}\n\n{question}" if question else text


class LeaveRequested(Exception):
    """Ctrl-C at an empty prompt."""


class PipeInput:
    """Turns from a pipe: one per line, or the lines between two triple-quote lines."""

    def __init__(self, stream):
        self.stream = stream

    def line(self, continuation: bool = False) -> str | None:
        line = self.stream.readline()
        return None if line == "" else line.rstrip("\n")


class TerminalInput:
    """Turns typed or pasted at a terminal, with prompt_toolkit (history in the state directory)."""

    def __init__(self, err):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        history = InMemoryHistory()
        path = state_dir() / "chat_history"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            history = FileHistory(str(path))
        except OSError as e:
            err.print(f"[dim]input history is not kept ({path}: {e.strerror})[/dim]")
        keys = KeyBindings()

        @keys.add("escape", "enter")  # Alt-Enter sends the same keys
        def _newline(event):
            event.current_buffer.insert_text("\n")

        @keys.add("c-c")
        def _interrupt(event):
            buf = event.current_buffer
            if buf.text:
                buf.reset()  # a half-typed turn is dropped, as in a shell
            else:
                event.app.exit(exception=LeaveRequested())

        self.session = PromptSession(history=history, key_bindings=keys, multiline=False,
                                     enable_history_search=False, prompt_continuation="... ")

    def line(self, continuation: bool = False) -> str | None:
        from prompt_toolkit.formatted_text import HTML
        try:
            return self.session.prompt(HTML("... " if continuation else "<ansigreen><b>&gt; </b></ansigreen>"))
        except EOFError:
            return None


def read_turn(source) -> str | None:
    """The next turn (None at the end): a line, or the lines of a triple-quoted block joined."""
    line = source.line()
    if line is None or not line.lstrip().startswith(FENCE):
        return line
    body = line.lstrip()[len(FENCE):]
    if body.rstrip().endswith(FENCE) and len(body.rstrip()) >= len(FENCE):  # """one line"""
        return body.rstrip()[:-len(FENCE)]
    lines = [body] if body else []
    while True:
        nxt = source.line(continuation=True)
        if nxt is None:  # the block was never closed: send what there is
            break
        if nxt.rstrip().endswith(FENCE):
            lines.append(nxt.rstrip()[:-len(FENCE)])
            break
        lines.append(nxt)
    return "\n".join(lines).strip("\n")


def status_line(engine, res) -> str:
    """What a user can check after a reply: the conversation's tokens, what the heads keep (average, and the
    range where they differ, as KVzip's do by design), KV memory against a full f16 cache, speed."""
    kept = engine.kv_tokens_per_head()
    low, high, mean = int(kept.min()), int(kept.max()), float(kept.mean())
    held = f"{mean:.0f} kept per KV head" + (f" ({low}-{high})" if low != high else "")
    return (f"[{engine.n_past} tokens in conversation, {held}, KV {res.kv_bytes_allocated / 2**20:.1f} MiB vs "
            f"{res.kv_bytes_full_f16 / 2**20:.1f} MiB full f16, {res.decode_tokens_per_s:.1f} tok/s]")


class ChatSession:
    def __init__(self, make_engine: Callable[..., object], *, system: str | None, max_tokens: int,
                 temperature: float, seed: int | None, policy: str, budget: int | None, out, err,
                 progress: Callable[[object], object] | None = None):
        self.make_engine = make_engine
        self.policy, self.budget = policy, budget
        self.system = system
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.out, self.err = out, err
        self.progress = progress  # engine -> an on_progress callback with a done() (localkv.progress)
        self.messages: list[dict] = self._fresh()
        self.engine = make_engine()
        if not self.engine.model.has_chat_template:
            name = Path(self.engine.model_path).name
            self.engine.close()
            raise LocalkvError(f"{name} has no chat template (a base model, never trained on turns): use "
                               "`localkv generate --raw` to complete text with it")
        self.interactive = sys.stdin.isatty()
        self.source = TerminalInput(err) if self.interactive else PipeInput(sys.stdin)
        self.saved = len(self.messages)  # messages as last saved or loaded: more are unsaved turns
        self._stop = False
        self.last = None

    def _fresh(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    # -- one turn

    def reply(self, text: str) -> None:
        """Answer one turn; an interrupted or failed turn is rolled back (message, cache and all)."""
        self.messages.append({"role": "user", "content": text})
        self._stop = False
        old = signal.signal(signal.SIGINT, self._on_sigint) if self.interactive else None
        progress = self.progress(self.engine) if self.progress else None

        def on_text(s: str) -> None:
            if progress is not None:
                progress.done()  # the reply starts: the progress line makes way
            sys.stdout.write(s)
            sys.stdout.flush()
        try:
            res = self.engine.generate(messages=self.messages, max_tokens=self.max_tokens,
                                       temperature=self.temperature, seed=self.seed, keep_history=True,
                                       on_text=on_text, should_stop=lambda: self._stop, on_progress=progress)
        except BaseException:
            self.messages.pop()  # generate rolled the prompt back
            raise
        finally:
            if progress is not None:
                progress.done()
            if old is not None:
                signal.signal(signal.SIGINT, old)
        sys.stdout.write("\n")
        if res.stop_reason == "interrupted":
            self.engine.rollback_turn()
            self.messages.pop()
            raise Interrupted("interrupted: the turn was rolled back (the conversation is as before it)")
        self.messages.append({"role": "assistant", "content": res.text})
        self.last = res
        self.err.print(f"[dim]{escape(status_line(self.engine, res))}[/dim]", highlight=False)

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
            self.out.print(HELP, markup=False)
        elif cmd == "/reset":
            self.messages = self._fresh()
            self.saved = len(self.messages)
            self.engine.reset()
            self.out.print("conversation cleared")
        elif cmd == "/stats":
            self._stats()
        elif cmd in ("/policy", "/budget"):
            self._switch(cmd, arg)
        elif cmd == "/file":
            path, text = file_turn(arg)
            self.err.print(f"[dim]{escape(path)}: {len(text)} characters[/dim]", highlight=False)
            self.reply(text)
        elif cmd == "/save":
            if not arg:
                raise LocalkvError("usage: /save FILE")
            save_conversation(arg, self.messages)
            self.saved = len(self.messages)
            self.out.print(f"saved {len(self.messages)} messages to {arg}")
        elif cmd == "/load":
            if not arg:
                raise LocalkvError("usage: /load FILE")
            self.messages = load_conversation(arg)
            self.saved = len(self.messages)
            self.engine.reset()
            self.out.print(f"loaded {len(self.messages)} messages (they are read again on the next turn)")
        else:
            raise LocalkvError(f"unknown command {cmd}: /help lists them")
        return True

    def _stats(self) -> None:
        rep = self.engine.memory_report(tokens=self.engine.n_past)
        kept = self.engine.kv_tokens_per_head()
        self.out.print(f"policy {rep.policy}, budget {rep.budget}, {self.engine.n_past} tokens in conversation, "
                       f"{kept.mean():.0f} kept per KV head on average ({kept.min()}-{kept.max()})\n"
                       f"KV allocated {rep.kv_bytes_allocated / 2**20:.2f} MiB; full cache for these tokens: "
                       f"f16 {rep.kv_bytes_full_f16 / 2**20:.2f} MiB, q8_0 {rep.kv_bytes_full_q8_0 / 2**20:.2f} MiB, "
                       f"q4_0 {rep.kv_bytes_full_q4_0 / 2**20:.2f} MiB")

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

    # -- the session

    def unsaved(self) -> bool:
        return len(self.messages) > self.saved and any(m["role"] == "user" for m in self.messages[self.saved:])

    def save_on_leave(self) -> None:
        """Leaving a terminal session with unsaved turns keeps them: saved to the state directory, path shown."""
        if not (self.interactive and self.unsaved()):
            return
        path = state_dir() / "chats" / time.strftime("chat-%Y%m%d-%H%M%S.json")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_conversation(str(path), self.messages)
        except (OSError, LocalkvError) as e:
            self.err.print(f"[red]error:[/red] the conversation could not be saved ({escape(str(e))})")
            return
        self.err.print(f"conversation saved to {escape(str(path))} (/load it in `localkv chat` to go on)",
                       highlight=False)

    def run(self) -> None:
        if self.interactive:
            self.err.print("[dim]localkv chat: /help for commands and keys, Ctrl-D to leave[/dim]")
        try:
            while self.step():
                pass
            self.save_on_leave()
        finally:
            self.engine.close()

    def step(self) -> bool:
        """Read and run one turn or command; False to leave. On a terminal no error ends the session."""
        try:
            line = read_turn(self.source)
        except LeaveRequested:
            return False
        if line is None:
            return False
        if not line.strip():
            return True
        try:
            if line.startswith("/"):
                return self.command(line.strip())
            self.reply(line)
        except (LocalkvError, KeyboardInterrupt) as e:
            if not self.interactive:
                raise
            msg = str(e) if isinstance(e, LocalkvError) else "interrupted"
            self.err.print(f"[yellow]{escape(msg)}[/yellow]" if isinstance(e, (Interrupted, KeyboardInterrupt))
                           else f"[red]error:[/red] {escape(msg)}", highlight=False)
        except Exception as e:  # a bug: one line, the conversation goes on
            if not self.interactive:
                raise
            self.err.print(f"[red]internal error:[/red] {escape(f'{type(e).__name__}: {e}')}", highlight=False)
        return True
