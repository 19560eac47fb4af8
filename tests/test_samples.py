"""The demo's training samples can show the model learning to stop (``samples/stopped_share``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_cats.assets import SHIPPED_DATASET
from lit_cats.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = ["--config", str(CONFIGS / "qlora.yaml"), "--config", str(CONFIGS / "tiny.yaml")]


def _stopped_share(run: Path) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run)).Reload()
    return [(e.step, e.value) for e in events.Scalars("samples/stopped_share")]


def test_demo_samples_have_room_for_every_shipped_answer(capsys, tokenizer):
    """A cap shorter than the answers the model learns would log 'never stopped' for ever."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *DEMO, "--print_config"])
    assert exit_.value.code in (0, None)
    cap = yaml.safe_load(capsys.readouterr().out)["samples"]["max_new_tokens"]
    rows = [json.loads(line) for line in SHIPPED_DATASET.read_text().splitlines() if line]
    answers = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]
    # An answer is its tokens plus the end marker that stops generation.
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    assert cap >= longest, f"samples.max_new_tokens {cap} < the longest shipped answer {longest}"


def test_briefly_trained_tiny_model_stops_more_often_than_the_untrained(run_dir, fit_args):
    # Samples only at the end of training (no validation): after 1 step, the model is as good
    # as untrained; after 20 steps of the demo's recipe it has learned to end its answers.
    quiet = ("--trainer.limit_val_batches", "0", "--hub.enabled", "false")
    main(fit_args("--trainer.max_steps", "1", *quiet))
    main(fit_args("--trainer.max_steps", "20", *quiet))
    runs = run_dir / "logs" / "tiny-cats"
    ((untrained_step, untrained),) = _stopped_share(runs / "version_0")
    ((trained_step, trained),) = _stopped_share(runs / "version_1")
    assert (untrained_step, trained_step) == (1, 20)
    assert trained > untrained, (trained, untrained)
    assert trained >= 0.75


def test_samples_take_the_fast_decode_loop_when_asked(run_dir, fit_args, caplog):
    # The samples run under training's autocast, so the fast loop runs without a CUDA graph
    # (on a GPU too); on the CPU `decode: fast` asks for it, `auto` would take the plain path.
    caplog.set_level(logging.INFO)
    quiet = ("--trainer.limit_val_batches", "0", "--hub.enabled", "false")
    main(fit_args("--trainer.max_steps", "1", "--samples.decode", "fast", *quiet))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generation:")]
    assert any(line.startswith("generation: fast decode (eager, no graph;") for line in lines)
    ((step, share),) = _stopped_share(run_dir / "logs" / "tiny-cats" / "version_0")
    assert step == 1 and 0 <= share <= 1
