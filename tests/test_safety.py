"""Nothing lost, nothing wrong written: runs that cannot train well stop, early, with the fix.

Each test drives ``lit-cats fit`` on the tiny model as a user does, and checks the exit status,
the message, whether the base model was loaded at all (a spy on ``lit_cats.model.load_base``:
the checks must come before the slow part), and what is left on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lit_cats.model
from lit_cats.cli import main

RUNS = Path("logs", "tiny-cats")


@pytest.fixture
def base_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The base models loaded during the test (the real loader, recorded)."""
    loaded: list[str] = []
    real = lit_cats.model.load_base

    def recording(name_or_path: str, *args, **kwargs):
        loaded.append(name_or_path)
        return real(name_or_path, *args, **kwargs)

    monkeypatch.setattr(lit_cats.model, "load_base", recording)
    return loaded


def refused(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``main(args)``, which must exit with status 2; return stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def write_chats(path: Path, rows: int, prompt_words: int) -> str:
    chats = [
        [
            {"role": "user", "content": " ".join(["meow"] * prompt_words) + f" {i}?"},
            {"role": "assistant", "content": "The void stares back."},
        ]
        for i in range(rows)
    ]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return str(path)


def test_every_answer_truncated_away_is_refused_before_the_model_loads(
    run_dir, fit_args, capsys, base_loads
):
    # Today's failure: every answer lies past max_seq_length, the run trains on 0 tokens, logs
    # a NaN loss, exits 0 and saves the adapter.
    data = write_chats(run_dir / "long.jsonl", rows=12, prompt_words=60)
    err = refused(
        fit_args("--data.dataset", data, "--data.max_seq_length", "24", "--trainer.max_steps", "2"),
        capsys,
    )
    assert "None of the 12 examples has a token to learn from" in err
    assert "max_seq_length=24" in err and "--data.max_seq_length" in err
    assert "rows 0, 1, 2, 3, 4 and 7 more" in err
    assert base_loads == []
    assert not (run_dir / "logs").exists()  # no adapter, no checkpoint, no empty version_0


def test_a_training_split_smaller_than_one_batch_is_refused_before_the_model_loads(
    run_dir, fit_args, capsys, base_loads
):
    data = write_chats(run_dir / "few.jsonl", rows=5, prompt_words=2)
    err = refused(fit_args("--data.dataset", data, "--data.val_size", "0"), capsys)
    assert "The training split has 5 examples" in err and "one batch of 8" in err
    assert "--data.batch_size" in err
    assert base_loads == []


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--model.optimizer.init_args.lr", "0"), "learning rate is 0; it must be greater than 0"),
        (("--model.optimizer.init_args.lr=-1e-4",), "--model.optimizer.init_args"),
        (
            ("--model.scheduler.init_args.warmup_steps", "10", "--trainer.max_steps", "4"),
            "warm-up lasts 10 optimizer steps but the run has 4",
        ),
    ],
    ids=["zero lr", "negative lr", "warm-up longer than the run"],
)
def test_settings_that_cannot_train_are_refused_before_the_model_loads(
    run_dir, fit_args, capsys, base_loads, flags, expected
):
    err = refused(fit_args(*flags), capsys)
    assert expected in err
    assert base_loads == []
    assert not (run_dir / "logs").exists()


def test_a_diverged_run_stops_and_saves_pushes_and_cards_nothing(
    run_dir, fit_args, capsys, base_loads
):
    # A learning rate of 1e30 sends the LoRA weights to ~1e30: the loss overflows by step 3.
    err = refused(
        fit_args(
            "--model.optimizer.init_args.lr", "1e30",
            "--trainer.max_steps", "8",
            "--trainer.log_every_n_steps", "2",
            "--checkpoint.every_n_train_steps", "1",
            "--samples.enabled", "false",
            "--hub.strategy", "end",  # only the final adapter would be pushed
        ),
        capsys,
    )  # fmt: skip
    assert "Training diverged: the loss became NaN or infinite at step" in err
    assert "--model.optimizer.init_args.lr" in err
    assert base_loads == ["lit-cats/tiny-phi3"]  # it did train
    run = run_dir / RUNS / "version_0"
    assert not (run / "adapter").exists()
    assert not (run / "README.md").exists()  # no model card
    assert not (run_dir / RUNS / "hub-dry-run").exists()  # the tiny config's dry-run push
    first_bad = int(err.split("infinite at step ")[1].split()[0])
    saved = sorted(int(p.stem.split("=")[1]) for p in (run / "checkpoints").glob("step=*.ckpt"))
    assert saved == list(range(1, first_bad))  # every checkpoint before the NaN, none after
    assert (run / "config.yaml").is_file()  # kept: its TensorBoard curve shows the divergence


def test_a_failed_run_leaves_no_empty_version_folder(run_dir, fit_args, capsys):
    earlier = run_dir / RUNS / "version_0"  # an earlier run's folder: never touched
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("model: {}\n")
    err = refused(fit_args("--data.dataset", "missing.jsonl"), capsys)
    assert "Dataset path 'missing.jsonl' does not exist" in err
    # Lightning created version_1 (TensorBoard file, hparams) before loading the data.
    assert [p.name for p in (run_dir / RUNS).iterdir()] == ["version_0"]
    assert (earlier / "config.yaml").read_text() == "model: {}\n"
