"""`peftrun chat` on the trained demo: one-shot with --prompt, and an interactive session in a terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftrun.cli.main import main
from peftrun.demo.run import held_out_rows

REPO = Path(__file__).resolve().parents[1]


def test_prompt_mode_answers_the_demo_task(demo_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (question, expected), *_ = held_out_rows()
    argv = ["chat", str(demo_run), "--prompt", question[-1]["content"], "--temperature", "0"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == expected


def test_checkpoint_directory_chats(demo_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint of the run (the last one equals final/) is a target like any other."""
    checkpoint = sorted((demo_run / "checkpoints").iterdir())[-1]
    (question, expected), *_ = held_out_rows()
    assert main(["chat", str(checkpoint), "--prompt", question[-1]["content"], "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_conversation_keeps_history_until_reset(demo_run: Path) -> None:
    from peftrun.use.chat import Conversation
    from peftrun.use.generate import load_for_generation

    loaded = load_for_generation(demo_run)
    conversation = Conversation(loaded, system="Be brief.")
    conversation.prompt_ids("Reverse the digits. 12")
    conversation.answered("21")
    second = loaded.tokenizer.decode(conversation.prompt_ids("Reverse the digits. 34"))
    assert second == (
        "<s><|system|>Be brief.<|end|><|user|>Reverse the digits. 12<|end|><|assistant|>21<|end|>"
        "<|user|>Reverse the digits. 34<|end|><|assistant|>"
    )
    conversation.reset()
    assert conversation.messages == [{"role": "system", "content": "Be brief."}]


class Terminal:
    """A child process on a pseudo-terminal: what a user at a shell would see and type."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        self.screen = ""

    def read_until(self, marker: str, timeout: float = 300) -> str:
        """Everything printed until `marker` appears (the marker included)."""
        start, deadline = len(self.screen), time.monotonic() + timeout
        while marker not in self.screen[start:]:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} within {timeout}s; screen:\n{self.screen}")
            ready, _, _ = select.select([self.master], [], [], 1.0)
            if ready:
                try:
                    self.screen += os.read(self.master, 4096).decode(errors="replace").replace("\r\n", "\n")
                except OSError:  # the child closed the terminal
                    break
        return self.screen[start:]

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())


def test_interactive_session_in_a_terminal(demo_run: Path) -> None:
    rows = held_out_rows()
    term = Terminal([sys.executable, "-m", "peftrun", "chat", str(demo_run), "--temperature", "0"])
    try:
        term.read_until(">>> ")
        for question, expected in rows[:2]:
            term.type(question[-1]["content"])
            shown = term.read_until(">>> ")
            assert expected in shown.split("\n", 1)[1], shown  # the line after the echoed input
            # The demo trained on one-turn conversations: each question in a fresh one.
            term.type("/reset")
            assert "conversation cleared" in term.read_until(">>> ")
        term.type("/nonsense")
        assert "unknown command /nonsense" in term.read_until(">>> ")
        term.type("/exit")
        assert term.process.wait(timeout=60) == 0
    finally:
        if term.process.poll() is None:
            term.process.kill()
        os.close(term.master)
    print(f"\n[chat transcript]\n{term.screen}")
