"""The Trainer commands that load a trained adapter (``AdapterModule``), driven through the CLI.

One short ``fit`` of the tiny model serves the whole module; ``predict`` and ``validate`` then
load its adapter as a user would, by stacking the configs.
"""

from __future__ import annotations

import json
import logging
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


def test_packed_validation_gives_the_padded_validation_loss(trained):
    # data.packing validates in token-budget rows too (one process): the same examples, the
    # same per-token mean, in a few packed rows instead of many padded batches of two.
    before = {p.name for p in trained.glob("version_*")}
    main(["validate", *STACK, *QUIET, "--model.adapter", "latest", "--samples.enabled", "false",
          "--data.packing", "true", "--data.max_tokens_per_batch", "1024"])  # fmt: skip
    [run] = [p for p in trained.glob("version_*") if p.name not in before]
    fit_loss = _events(trained / "version_0").Scalars("loss/val")[-1].value
    assert _events(run).Scalars("loss/val")[-1].value == pytest.approx(fit_loss, rel=1e-3)


def test_predict_through_the_fast_loop_with_refill_answers_as_the_plain_path(trained, caplog):
    # Greedy, so both paths must give the same tokens; 3 prompts a batch into 2 slots: refill.
    caplog.set_level(logging.INFO)
    runs = {}
    for decode in ("plain", "fast"):
        before = {p.name for p in trained.glob("version_*")}
        main(
            [
                "predict", *STACK, "--config", str(CONFIGS / "predict.yaml"), *QUIET,
                "--model.generation.max_new_tokens", "6", "--model.generation.do_sample", "false",
                "--model.generation.decode", decode, "--model.generation.batch_size", "2",
                "--data.predict_batch_size", "3",
            ]
        )  # fmt: skip
        [run] = [p for p in trained.glob("version_*") if p.name not in before]
        runs[decode] = _records(run)
    assert runs["fast"] == runs["plain"]
    assert len(runs["fast"]) == len(_predict_yaml_prompts())
    lines = {r.getMessage() for r in caplog.records if r.getMessage().startswith("generation:")}
    assert "generation: plain transformers generate (decode='plain')" in lines
    assert any(line.startswith("generation: fast decode (eager, no graph; static KV cache 2 slots")
               for line in lines)  # fmt: skip


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "holds no prompts (it is empty or blank)"),
        (b"\n  \n", "holds no prompts (it is empty or blank)"),
        (b"\xff\xfe meow", "Cannot read prompt file"),
    ],
    ids=["empty", "blank", "not UTF-8"],
)
def test_an_empty_or_unreadable_prompts_file_is_an_error_before_the_model_loads(
    run_dir, capsys, monkeypatch, content, expected
):
    import lit_cats.model

    loaded = []
    monkeypatch.setattr(lit_cats.model, "load_base", lambda *a, **k: loaded.append(a))
    (run_dir / "prompts.txt").write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        # The predict config's inline prompts are there too: the file is not silently skipped.
        main(
            [
                "predict", *STACK, "--config", str(CONFIGS / "predict.yaml"), *QUIET,
                "--model.adapter", "null", "--data.prompts_file", "prompts.txt",
            ]
        )  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "prompts.txt" in err and "Traceback" not in err
    assert loaded == []  # refused before the base model loads
    assert not (run_dir / "logs").exists()  # and no empty run folder is left behind
