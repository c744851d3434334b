"""`localkv chat` in a pseudo-terminal, driven as a person would: pastes, /file, Ctrl-C, errors.

The real command runs under pexpect with a real terminal (prompt_toolkit's line editor, bracketed paste); the
answers come from the default model, greedy. PROMPT_TOOLKIT_NO_CPR: pexpect answers no cursor-position query.
"""
import json
import os
import random
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

pytestmark = pytest.mark.model

STATUS = "tokens in conversation"  # the status line after every reply
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


@pytest.fixture
def chat(tmp_path):
    procs = []

    def spawn(*args):
        env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm",
                   LOCALKV_STATE="")
        p = pexpect.spawn(sys.executable, ["-m", "localkv.cli", "chat", "--temperature", "0", *args], env=env,
                          encoding="utf-8", dimensions=(50, 200), timeout=180)
        p.expect("/help for commands")
        procs.append(p)
        return p
    yield spawn
    for p in procs:
        p.terminate(force=True)


def answer(p) -> str:
    """The reply to the turn just sent (what the terminal showed up to the status line), back at the prompt."""
    p.expect(STATUS)
    text = p.before
    p.expect("> ")
    return text


def saved(p, path) -> list[dict]:
    p.sendline(f"/save {path}")
    p.expect("saved")
    p.expect("> ")
    return json.loads(path.read_text())["messages"]


PARAGRAPHS = [
    "The town of Elmsford sits on a bend of the river. Its mill was built in 1820 and still grinds flour.",
    "Every spring the council holds a fair on the green, with bread, cheese and cider from the valley.",
    "The library opens at nine and closes at five, except on Sundays, when it stays closed all day.",
    "The old bridge was repaired last year after a flood damaged two of its stone pillars.",
    "The spare key to the community hall is hidden under the blue flowerpot beside the side door.",
]


def test_a_paste_is_one_turn_and_errors_keep_the_session(chat, tmp_path):
    p = chat("--max-tokens", "40")
    doc = "\r\r".join(PARAGRAPHS) + "\r\rWhere is the spare key to the community hall hidden?"
    p.send(PASTE_START + doc + PASTE_END + "\r")
    reply = answer(p)
    assert "flowerpot" in reply
    msgs = saved(p, tmp_path / "one.json")
    assert [m["role"] for m in msgs] == ["user", "assistant"]  # five paragraphs and a question: one turn
    assert all(par in msgs[0]["content"] for par in PARAGRAPHS)
    # a failed command is one line and the conversation goes on
    p.sendline(f"/save {tmp_path}/no/such/dir/chat.json")
    p.expect("cannot save to")
    p.expect("> ")
    p.sendline("/load /no/such/file.json")
    p.expect("cannot read")
    p.expect("> ")
    p.sendline("/nonsense")
    p.expect("unknown command")
    p.expect("> ")
    # Alt-Enter (Esc Enter) adds a line to the turn instead of sending it
    p.send("In one word, what colour is the flowerpot?\x1b\rAnswer in lowercase.\r")
    assert "blue" in answer(p).lower()
    assert len(saved(p, tmp_path / "two.json")) == 4
    # Ctrl-C at an empty prompt leaves; the unsaved turn... none here: it was just saved
    p.send("\x03")
    p.expect(pexpect.EOF)
    assert "conversation saved to" not in p.before


def test_file_then_ctrl_c_during_prefill_rolls_the_turn_back(chat, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("Shopping list for Saturday:\n- eggs\n- flour\n- 3 lemons\n\nThe bakery closes at 14:00.\n")
    rng = random.Random(0)
    words = "river mill green bread cheese cider library bridge flood pillar council fair spring lantern".split()
    long_doc = tmp_path / "long.txt"
    long_doc.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(30)))

    p = chat("--max-tokens", "24", "--policy", "snapkv", "--budget", "256")
    p.sendline("My name is Ada Lovelace and I live in Bristol.")
    answer(p)
    p.sendline(f"/file {note} When does the bakery close?")
    assert "14:00" in answer(p)
    # a long document: the progress line shows, Ctrl-C stops the reading at the next chunk
    p.sendline(f"/file {long_doc} Summarise this.")
    p.expect("reading the prompt: ")
    p.send("\x03")
    p.expect("interrupted while the prompt was read: the turn was rolled back")
    p.expect("> ")
    p.sendline("What is my name?")
    assert "Ada" in answer(p)
    msgs = saved(p, tmp_path / "after.json")
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert not any("Summarise" in m["content"] for m in msgs)
    # a turn after the save, then Ctrl-C at the empty prompt: saved on the way out, and the file named
    p.sendline("Thank you.")
    answer(p)
    p.send("\x03")
    p.expect(r"conversation saved to (\S+\.json)")
    path = p.match.group(1)
    p.expect(pexpect.EOF)
    assert [m["content"] for m in json.loads(open(path).read())["messages"]][-2] == "Thank you."
    # the input history is kept across sessions, in the state directory
    history = (tmp_path / "state" / "localkv" / "chat_history").read_text()
    assert "What is my name?" in history


def test_generate_shows_progress_on_a_terminal_only(tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text(" ".join(f"line {i} of the log says all is well." for i in range(120)))
    args = ["-m", "localkv.cli", "generate", "--prompt-file", str(doc), "--max-tokens", "1", "--temperature", "0"]
    p = pexpect.spawn(sys.executable, args, env=dict(os.environ, TERM="xterm"), encoding="utf-8", timeout=180)
    p.expect(r"reading the prompt: [\d,]+ / [\d,]+ tokens, \d+ tok/s")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    import subprocess
    piped = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=180)
    assert piped.returncode == 0 and "reading the prompt" not in piped.stderr + piped.stdout
