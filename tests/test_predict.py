"""The Trainer commands that load a trained adapter (``AdapterModule``), driven through the CLI.

One short ``fit`` of the tiny model serves the whole module; ``predict`` and ``validate`` then
load its adapter as a user would, by stacking the configs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, tiny_fit_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_cats.cli import main
from lit_cats.inference.report import RECORD_KEYS

STACK = ["--config", str(CONFIGS / "qlora.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The experiment folder of a 4-step fit that validates (and samples) at steps 2 and 4.

    The working directory stays there for the module, so later commands find ``logs/``.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("predict"))
        main(
            tiny_fit_args(
                "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                "--hub.enabled", "false", "--samples.max_new_tokens", "6",
            )
        )  # fmt: skip
        yield Path.cwd() / "logs" / "tiny-cats"


@pytest.fixture(scope="module")
def predicted(trained: Path) -> Path:
    """The folder of a ``predict`` run with the shipped predict config (the latest adapter)."""
    main(
        [
            "predict", *STACK, "--config", str(CONFIGS / "predict.yaml"), *QUIET,
            "--model.generation.max_new_tokens", "5", "--data.predict_batch_size", "3",
        ]
    )  # fmt: skip
    [jsonl] = trained.glob("version_*/predictions.jsonl")
    return jsonl.parent


def _events(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    return events


def _predict_yaml_prompts() -> list[str]:
    return yaml.safe_load((CONFIGS / "predict.yaml").read_text())["data"]["prompts"]


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_fit_logs_sample_answers_at_each_validation(trained):
    texts = _events(trained / "version_0").Tensors("samples/0/text_summary")
    assert [e.step for e in texts] == [2, 4]  # each validation; the end is the same step
    assert b"knock things off the table" in texts[-1].tensor_proto.string_val[0]


def test_fit_logs_sample_metrics_at_each_validation(trained):
    scalars = _events(trained / "version_0").Scalars("samples/stopped_share")
    assert [e.step for e in scalars] == [2, 4]


def test_predict_answers_every_prompt_in_order(predicted):
    assert [r["prompt"] for r in _records(predicted)] == _predict_yaml_prompts()


def test_predict_records_hold_the_record_keys_within_the_token_limit(predicted):
    records = _records(predicted)
    assert all(tuple(r) == RECORD_KEYS for r in records)
    assert all(1 <= r["num_tokens"] <= 5 for r in records)


def test_predict_markdown_names_every_prompt_and_the_latest_adapter(predicted):
    markdown = (predicted / "predictions.md").read_text()
    assert all(prompt in markdown for prompt in _predict_yaml_prompts())
    assert "version_0/adapter" in markdown


def test_predict_writes_the_generation_metrics(predicted):
    metrics = json.loads((predicted / "predictions.metrics.json").read_text())
    assert set(metrics) == {
        "stopped_share", "mean_length", "distinct_2", "cat_vocab_share", "existential_share",
    }  # fmt: skip


def test_validate_with_the_trained_adapter_matches_the_fits_last_validation(trained):
    before = {p.name for p in trained.glob("version_*")}
    main(["validate", *STACK, *QUIET, "--model.adapter", "latest", "--samples.enabled", "false"])
    [run] = [p for p in trained.glob("version_*") if p.name not in before]
    fit_loss = _events(trained / "version_0").Scalars("loss/val")[-1].value
    assert _events(run).Scalars("loss/val")[-1].value == pytest.approx(fit_loss, rel=1e-3)
