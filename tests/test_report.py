"""The shared answer report: record, Markdown, files and metrics of predict and the samples."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from tensorboard.plugin_util import markdown_to_safe_html

from lit_cats.callbacks.prediction_writer import PredictionWriter
from lit_cats.callbacks.samples import log_samples
from lit_cats.inference.generation import GenerationResult
from lit_cats.inference.report import (
    RECORD_KEYS,
    answer_markdown,
    answer_record,
    answers_markdown,
    describe_run,
    generation_metrics,
    write_report,
)

CHAT = [{"role": "user", "content": "Is the void warm?"}]
RECORDS = [
    {"prompt": "Why boxes?", "response": "The box is me.", "num_tokens": 6, "stopped": True},
    {"prompt": CHAT, "response": "", "num_tokens": 8, "stopped": False},
]


def test_a_record_holds_the_result_fields_in_file_order():
    record = answer_record(GenerationResult("meow", "Purr.", 3, True))
    assert list(record.items()) == list(zip(RECORD_KEYS, ("meow", "Purr.", 3, True), strict=True))


def test_answer_markdown_has_heading_answer_and_ending():
    assert answer_markdown(RECORDS[0], 1) == (
        "## 1. Why boxes?\n\nThe box is me.\n\n*6 tokens, stopped by itself*\n"
    )


def test_answer_markdown_titles_a_chat_by_its_last_user_message_and_marks_empty_answers():
    assert answer_markdown(RECORDS[1], 2) == (
        "## 2. Is the void warm?\n\n*(empty answer)*\n\n*8 tokens, hit the token limit*\n"
    )


def test_answer_markdown_renders_in_tensorboard_without_escaped_html():
    html = markdown_to_safe_html(answer_markdown(RECORDS[0], 1))
    assert "&lt;" not in html and "<em>6 tokens, stopped by itself</em>" in html


def test_report_markdown_is_title_header_then_numbered_answers():
    text = answers_markdown(RECORDS, ["- adapter: `none`"])
    expected_start = "# lit-cats predictions\n\n- adapter: `none`\n\n## 1. Why boxes?"
    assert text.startswith(expected_start)
    assert text.endswith("\n\n" + answer_markdown(RECORDS[1], 2))


def test_describe_run_names_model_adapter_generation_and_metrics():
    lines = describe_run("tiny", "4-bit", "logs/a", "greedy", {"stopped_share": 0.5})
    assert lines == [
        "- model: `tiny` (4-bit)",
        "- adapter: `logs/a`",
        "- generation: `greedy`",
        "- metrics: stopped_share 0.5",
    ]


def test_write_report_writes_jsonl_markdown_and_metrics(tmp_path):
    written = write_report(tmp_path / "out", "p", RECORDS, {"stopped_share": 0.5}, ["- x"])
    assert [p.name for p in written] == ["p.jsonl", "p.md", "p.metrics.json"]


def test_jsonl_round_trips_the_records_and_keeps_non_ascii(tmp_path):
    records = [{**RECORDS[0], "response": "Miau, ça va."}]
    [jsonl, _] = write_report(tmp_path, "p", records, {}, None)
    assert "ça va" in jsonl.read_text(encoding="utf-8")
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == records


def test_write_report_without_a_header_writes_no_markdown(tmp_path):
    written = write_report(tmp_path, "p", RECORDS, {"stopped_share": 0.5}, None)
    assert [p.name for p in written] == ["p.jsonl", "p.metrics.json"]


def test_metrics_file_holds_the_metrics(tmp_path):
    metrics = {"stopped_share": 0.5, "mean_length": 7.0}
    [*_, path] = write_report(tmp_path, "p", RECORDS, metrics, None)
    assert json.loads(path.read_text()) == metrics


def test_generation_metrics_use_the_given_vocabularies():
    metrics = generation_metrics(RECORDS, cat_words=["box"], existential_words=["void"], sync=False)
    assert (metrics["cat_vocab_share"], metrics["existential_share"]) == (0.5, 0.0)


class _TextLogger:
    """A logger with TensorBoard's ``add_text``, recording what it is given."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str, int]] = []
        self.experiment = SimpleNamespace(add_text=self._add_text)

    def _add_text(self, tag: str, text: str, global_step: int) -> None:
        self.texts.append((tag, text, global_step))

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def save(self) -> None:
        pass


def test_samples_log_the_same_markdown_as_the_report():
    logger = _TextLogger()
    log_samples(SimpleNamespace(loggers=[logger]), RECORDS, {}, step=3)
    assert logger.texts == [
        ("samples/0", answer_markdown(RECORDS[0], 1), 3),
        ("samples/1", answer_markdown(RECORDS[1], 2), 3),
    ]


@pytest.mark.parametrize("name", ["", "a/b"])
def test_prediction_writer_refuses_a_name_that_is_not_a_file_stem(name):
    with pytest.raises(ValueError, match="plain file stem"):
        PredictionWriter(name=name)
