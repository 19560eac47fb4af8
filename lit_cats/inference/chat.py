"""``lit-cats chat``: talk to a trained adapter in the terminal, answers streamed as they decode.

The conversation is kept and sent back each turn in the model's chat template; when it no longer
fits the context (``--context_tokens``, default the model's, minus ``max_new_tokens``) the oldest
turns are dropped, and the chat says so. ``/reset``, ``/system TEXT`` and ``/exit`` are commands;
Ctrl-C stops an answer, not the chat. With stdin not a terminal (a pipe, a file), each line is a
message and each answer one line of stdout; what the chat says about itself goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from lit_cats.errors import UsageError
from lit_cats.inference.command import LoadedModel, load_model, parse
from lit_cats.inference.generation import GenerationSettings, context_length, encode_prompt
from lit_cats.inference.stream import RequestStream

#: Where Lightning's ``rank_zero_info`` logs (lit_cats.inference.decode says its path there).
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
HELP = "Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit."
Message = dict[str, str]


def chat_options(transcript: str | None = None, context_tokens: int | None = None) -> None:
    """Talk to a trained adapter (or merged model) in the terminal; answers stream as they
    decode. Takes the training configs as predict does: lit-cats chat --config
    configs/qlora.yaml --config configs/tiny.yaml (the newest adapter; --model.adapter PATH for
    another). Sampling: --model.generation.* (predict's). Commands: /reset, /system TEXT, /exit.

    Args:
        transcript: Append each turn (the messages sent, the prompt as the model saw it, the
            answer) to this JSON-lines file.
        context_tokens: Longest conversation kept, in tokens, answer included (default: the
            model's context length). Older turns are dropped beyond it.
    """


def run_chat(args: Sequence[str]) -> None:
    """``lit-cats chat ARGS``: parse, load the model, and talk until /exit or end of input."""
    cli = parse("chat", chat_options, args)
    settings: GenerationSettings = cli.model.generation
    if settings.raw:
        raise UsageError("chat needs the chat template; drop --model.generation.raw.")
    loaded = load_model(cli)
    config = cli.config
    limit = config.get("context_tokens") or context_length(loaded.model)
    if limit is not None and limit <= settings.max_new_tokens:
        raise UsageError(
            f"--context_tokens {limit} leaves no room for a prompt with max_new_tokens="
            f"{settings.max_new_tokens}; raise it or lower --model.generation.max_new_tokens."
        )
    session = ChatSession(loaded, settings, limit, config.get("transcript"))
    session.run(sys.stdin, sys.stdout, interactive=sys.stdin.isatty())


def _drop_generation_notes(record: logging.LogRecord) -> bool:
    """A logging filter: False for the decode module's ``generation: <path>`` notes."""
    return not record.getMessage().startswith("generation: ")


class ChatSession:
    """One conversation with a loaded model.

    Args:
        loaded: The model, its tokenizer and how to describe it.
        settings: Sampling settings (predict's); turn ``i`` is seeded with ``seed + i``.
        context_tokens: Longest prompt + answer; ``None``: no limit known.
        transcript: JSON-lines file to append each turn to.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        settings: GenerationSettings,
        context_tokens: int | None,
        transcript: str | None = None,
    ) -> None:
        self.loaded, self.settings, self.context_tokens = loaded, settings, context_tokens
        self.transcript = Path(transcript) if transcript else None
        self.system: str | None = settings.system_prompt
        self.history: list[Message] = []
        self.turns = 0

    # ------------------------------------------------------------------------------ the loop
    def run(self, stdin: TextIO, stdout: TextIO, interactive: bool) -> None:
        """Read messages and commands until /exit or end of input."""
        info = sys.stderr
        print(f"lit-cats chat: {self.loaded.description}", file=info)
        for name in RANK_ZERO_LOGGERS:  # the decode path's notes would land inside an answer
            logging.getLogger(name).addFilter(_drop_generation_notes)
        if interactive:
            print(f"{HELP} Ctrl-C stops an answer.", file=info)
        while True:
            try:
                line = input("you> ") if interactive else stdin.readline()
            except KeyboardInterrupt:
                print("\n(Ctrl-C stops an answer; /exit or Ctrl-D leaves.)", file=info)
                continue
            except EOFError:
                line = ""
                interactive = False  # end of input in a terminal: leave as a pipe does
            if not line and not interactive:
                return
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text, info):
                    return
                continue
            self.answer(text, stdout, prefix="cat> " if interactive else "")

    def command(self, text: str, info: TextIO) -> bool:
        """Run a /command; False to leave the chat."""
        name, _, rest = text.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = []
            print("(conversation cleared)", file=info)
        elif name == "/system":
            self.system = rest.strip() or None
            said = f"set: {self.system}" if self.system else "cleared"
            print(f"(system prompt {said}; it applies from the next answer)", file=info)
        else:
            print(f"Unknown command {name}. {HELP}", file=info)
        return True

    # ------------------------------------------------------------------------------ a turn
    def answer(self, text: str, out: TextIO, prefix: str = "") -> None:
        """Answer one user message, streaming it to ``out``; Ctrl-C stops it."""
        self.history.append({"role": "user", "content": text})
        ids = self.fit_history()
        if ids is None:
            self.history.pop()
            return
        settings = self.settings
        if settings.seed is not None:
            settings = replace(settings, seed=settings.seed + self.turns)
        self.turns += 1
        loaded = self.loaded
        stream = RequestStream(
            loaded.model, loaded.tokenizer, [self.messages()], [ids], [settings], loaded.context
        )
        if self.turns == 1:
            path = "the fast decode loop" if stream.fast else "transformers' generate"
            print(f"(answers come from {path})", file=sys.stderr)
        out.write(prefix)
        interrupted = False
        try:
            for pieces in stream:
                out.write(pieces[0])
                out.flush()
        except KeyboardInterrupt:
            stream.close()
            interrupted = True
        row = stream.rows[0]
        out.write(" [stopped]\n" if interrupted else "\n")
        out.flush()
        self.history.append({"role": "assistant", "content": row.text})
        self.record(ids, row.text, row.num_tokens, row.stopped, interrupted)

    def messages(self) -> list[Message]:
        """What the model is sent: the system prompt, if any, then the conversation."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history]

    def fit_history(self) -> list[int] | None:
        """The prompt's token ids, dropping the oldest turns until prompt + answer fit; None
        (with a message) when the newest message alone does not fit."""
        tokenizer, budget = self.loaded.tokenizer, self.budget()
        dropped = 0
        while True:
            ids = encode_prompt(tokenizer, self.messages())
            if budget is None or len(ids) <= budget:
                break
            if len(self.history) <= 1:
                print(
                    f"(this message is {len(ids)} tokens; with max_new_tokens="
                    f"{self.settings.max_new_tokens} at most {budget} fit the context of "
                    f"{self.context_tokens} tokens: send a shorter one)",
                    file=sys.stderr,
                )
                return None
            self.history = self.history[2:]  # the oldest user message and its answer
            dropped += 1
        if dropped:
            print(
                f"(history trimmed: dropped the {dropped} oldest turn(s) to fit the context of "
                f"{self.context_tokens} tokens)",
                file=sys.stderr,
            )
        return ids

    def budget(self) -> int | None:
        """Longest prompt that leaves room for a full answer."""
        if self.context_tokens is None:
            return None
        return self.context_tokens - self.settings.max_new_tokens

    def record(
        self, ids: list[int], response: str, num_tokens: int, stopped: bool, interrupted: bool
    ) -> None:
        """Append the turn to the transcript file, if one was asked for."""
        if self.transcript is None:
            return
        record = {
            "messages": self.messages()[:-1],  # as sent: without the answer just added
            "prompt": self.loaded.tokenizer.decode(ids),
            "prompt_tokens": len(ids),
            "response": response,
            "num_tokens": num_tokens,
            "stopped": stopped,
            "interrupted": interrupted,
        }
        with self.transcript.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
