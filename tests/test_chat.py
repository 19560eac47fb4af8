"""``lit-cats chat`` on the tiny model: through a real pseudo-terminal (pexpect) and a pipe.

The chat runs as a user runs it, a ``lit-cats`` process in a folder whose ``logs/`` holds a
saved adapter (found as ``latest``); what it sent to the model is read back from its
``--transcript`` file (the decoded prompt ids of each turn).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, save_random_adapter

from lit_cats.cli import main
from lit_cats.recipe import load_base
from lit_cats.tiny import TINY_MODEL_ID

pexpect = pytest.importorskip("pexpect")

LIT_CATS = str(Path(sys.executable).with_name("lit-cats"))
STACK = ["--config", str(CONFIGS / "qlora.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path) -> Path:
    """A folder whose logs/tiny-cats/version_0/adapter is a random (non-zero) tiny adapter."""
    root = tmp_path_factory.mktemp("chat")
    base = load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")
    torch.manual_seed(0)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    save_random_adapter(base, root / "logs/tiny-cats/version_0/adapter", targets, 4)
    return root


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _spawn(workdir: Path, *extra: str):
    args = ["chat", *STACK, *extra]
    return pexpect.spawn(LIT_CATS, args, cwd=str(workdir), env=ENV, encoding="utf-8", timeout=120)


def test_terminal_chat_keeps_history_resets_and_exits(workdir):
    transcript = workdir / "terminal.jsonl"
    child = _spawn(
        workdir, "--model.generation.max_new_tokens", "8", "--transcript", str(transcript)
    )
    child.expect("lit-cats chat: lit-cats/tiny-phi3 \\+ adapter logs/tiny-cats/version_0/adapter")
    child.expect_exact("you> ")
    answers = []
    for question in ("Why the red dot?", "And the empty box?", "/reset", "Hello, cat."):
        child.sendline(question)
        if question == "/reset":
            child.expect_exact("(conversation cleared)")
        else:
            child.expect_exact("cat> ")
        child.expect_exact("you> ")
        answers.append(child.before.strip())
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    first, second, third = _records(transcript)
    assert first["response"] and answers[0].startswith(first["response"][:5])
    # Turn 2 was sent the whole conversation: turn 1's question and the model's own answer.
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert "Why the red dot?" in second["prompt"] and first["response"] in second["prompt"]
    assert second["prompt"].index(first["response"]) < second["prompt"].index("And the empty box?")
    # After /reset only the new message is sent.
    assert third["messages"] == [{"role": "user", "content": "Hello, cat."}]
    assert "red dot" not in third["prompt"]


def test_ctrl_c_stops_an_answer_not_the_chat(workdir):
    transcript = workdir / "interrupted.jsonl"
    long_answer = [
        "--model.generation.max_new_tokens", "3000", "--model.generation.min_new_tokens", "3000",
    ]  # fmt: skip
    child = _spawn(
        workdir, *long_answer, "--context_tokens", "4096", "--transcript", str(transcript)
    )
    child.expect_exact("you> ")
    child.sendintr()  # at the prompt: a hint, and the chat goes on
    child.expect_exact("/exit or Ctrl-D leaves")
    child.sendline("Tell me everything about boxes.")
    child.expect_exact("cat> ")
    child.expect(r"\S{3}")  # the answer has begun streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact("you> ")
    child.sendline("/system You are a very small cat.")
    child.expect_exact("(system prompt set: You are a very small cat.")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    [record] = _records(transcript)
    assert record["interrupted"] and not record["stopped"] and record["response"]


def test_pipe_mode_one_line_per_answer_and_trimmed_history(workdir):
    transcript = workdir / "pipe.jsonl"
    questions = ["Why do you sit in boxes?", "Why the red dot?", "Is the human in charge?"]
    run = subprocess.run(
        [LIT_CATS, "chat", *STACK, "--model.generation.max_new_tokens", "6",
         "--model.generation.do_sample", "false", "--context_tokens", "48",
         "--transcript", str(transcript)],
        input="\n".join(["meow " * 40, questions[0], "", "/nonsense", *questions[1:]]) + "\n",
        cwd=workdir, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    records = _records(transcript)
    assert run.stdout.splitlines() == [r["response"] for r in records]
    assert len(records) == 3
    assert "Unknown command /nonsense" in run.stderr
    # A message that cannot fit even alone is refused, and the chat goes on.
    assert "this message is" in run.stderr and "send a shorter one" in run.stderr
    # A 48-token context holds the newest turns only: the oldest were dropped, and it said so.
    assert re.search(r"history trimmed: dropped the \d+ oldest turn", run.stderr)
    assert all(r["prompt_tokens"] + 6 <= 48 for r in records)
    assert questions[0] not in records[-1]["prompt"] and questions[2] in records[-1]["prompt"]


def test_raw_mode_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", *STACK, "--model.generation.raw", "true"])
    assert exit_info.value.code == 2
    assert "chat needs the chat template" in capsys.readouterr().err
