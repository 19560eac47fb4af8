"""Errors a person can read: a mistake prints ``error: <what and what to do>`` and exits 2.

No traceback unless asked for (``LIT_CATS_DEBUG=1`` or ``--debug``); a bug keeps its traceback.
Driven through ``lit_cats.cli.main`` as the console script calls it, and once through the
console script itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lit_cats.cli
from lit_cats.cli import explain_parse_error, main
from lit_cats.errors import InvalidSetting, MissingFile, UsageError


def usage_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """stderr of ``main(args)``, which must be one short usage error (status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err[err.index("error: ") :]
    assert len(message.splitlines()) <= 4, message  # the message, suggestions, a --help hint
    return message


def test_an_unknown_option_gets_did_you_mean(run_dir, fit_args, capsys):
    message = usage_error(fit_args("--model.lora_alpah", "8"), capsys)
    assert message.startswith("error: unrecognized arguments: --model.lora_alpah 8")
    assert "--model.lora_alpah: did you mean --model.lora_alpha?" in message
    assert "lit-cats fit --help" in message
    assert not (run_dir / "logs").exists()


def test_an_unknown_config_file_key_gets_did_you_mean(run_dir, fit_args, capsys):
    (run_dir / "mine.yaml").write_text("data:\n  max_seq_lenght: 128\n")
    message = usage_error(fit_args("--config", "mine.yaml"), capsys)
    assert "does not accept option 'data.max_seq_lenght'" in message
    assert "data.max_seq_lenght: did you mean data.max_seq_length?" in message


def test_a_misspelled_command_gets_did_you_mean(capsys):
    assert "did you mean 'predict'?" in usage_error(["predcit"], capsys)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--data.val_size", "1.5"), "val_size is a fraction in [0, 1), got 1.5."),
        (("--model.r", "0"), "LoRA rank r must be a positive integer, got 0."),
        (("--model.speed.loss_chunk_size", "0"), "loss_chunk_size must be >= 1 or null, got 0"),
        (
            (
                "--model.speed.gradient_checkpointing",
                "auto",
                "--model.speed.uncheckpointed_layers",
                "2",
            ),
            "gradient_checkpointing is auto, which may turn it off",
        ),
    ],
    ids=["data setting", "model setting", "speed setting", "automatic checkpointing"],
)
def test_a_bad_setting_is_one_line(run_dir, fit_args, capsys, args, expected):
    message = usage_error(fit_args(*args), capsys)
    assert message.splitlines() == [f"error: {message[len('error: ') :].strip()}"]
    assert expected in message


def test_helper_commands_report_mistakes_the_same_way(run_dir, capsys):
    message = usage_error(["merge", "--adapter", "./no/such/adapter"], capsys)
    assert message.startswith("error: Adapter './no/such/adapter': no such folder.")
    message = usage_error(["push", str(run_dir), "--dry_run_dir", "out"], capsys)
    assert "No adapter in" in message
    assert "did you mean --repo_id?" in usage_error(["push", ".", "--repoid", "a/b"], capsys)


def test_debug_shows_the_traceback_of_a_usage_error(run_dir, capsys, monkeypatch):
    monkeypatch.setenv("LIT_CATS_DEBUG", "1")
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--adapter", "./no/such/adapter"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "resolve_adapter" in err
    assert err.rstrip().endswith("or 'latest'.")  # the message still comes last


def test_a_bug_keeps_its_traceback(monkeypatch):
    def tiny(cache_dir: str | None = None) -> None:
        """A command with a bug."""
        raise KeyError("not a user's mistake")

    monkeypatch.setattr(lit_cats.cli, "build_tiny", tiny)
    with pytest.raises(KeyError, match="not a user's mistake"):
        main(["tiny"])


def test_user_errors_keep_the_types_callers_catch():
    assert issubclass(InvalidSetting, ValueError) and issubclass(InvalidSetting, UsageError)
    assert issubclass(MissingFile, FileNotFoundError) and issubclass(MissingFile, UsageError)


def test_suggestions_leave_out_the_parent_option():
    options = ["--model", "--model.r", "--model.lora_alpha", "--data.dataset"]
    message = explain_parse_error("unrecognized arguments: --model.rr 3", options, "fit")
    assert "  --model.rr: did you mean --model.r?" in message.splitlines()


def test_the_console_script_exits_2_without_a_traceback(run_dir, fit_args):
    script = Path(sys.executable).with_name("lit-cats")
    args = fit_args("--data.val_size", "1.5")
    quiet = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines()[-1].startswith("error: val_size is a fraction")
    assert "Traceback" not in quiet.stderr
    assert "args parameter" not in quiet.stderr  # Lightning's args-vs-sys.argv warning
    env = {**os.environ, "LIT_CATS_DEBUG": "1"}
    loud = subprocess.run(
        [str(script), *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert loud.returncode == 2 and "Traceback" in loud.stderr
