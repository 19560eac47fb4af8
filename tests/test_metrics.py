"""Generation metrics on hand-made answers."""

from __future__ import annotations

import pytest

from lit_cats.inference.metrics import (
    DistinctN,
    GenerationMetrics,
    MeanAnswerLength,
    StoppedShare,
    VocabularyShare,
    compute_generation_metrics,
)


def test_stopped_share_accumulates_over_updates():
    stopped = StoppedShare()
    stopped.update([True, False, True])
    stopped.update([True])
    assert stopped.compute().item() == pytest.approx(0.75)


def test_mean_length_is_per_answer_over_updates():
    length = MeanAnswerLength()
    length.update([10, 20])
    length.update([60])
    assert length.compute().item() == pytest.approx(30.0)


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")
def test_a_share_of_no_answers_is_zero():
    assert StoppedShare().compute().item() == 0.0


def test_distinct_2_counts_unique_word_bigrams_over_all_answers():
    metric = DistinctN(2)
    # "the cat sat" -> (the cat)(cat sat); "The cat sat!" repeats both; "a cat" -> (a cat)
    metric.update(["the cat sat", "The cat sat!"])
    metric.update(["a cat", "meow"])  # "meow" has no bigram
    assert metric.compute().item() == pytest.approx(3 / 5)


def test_distinct_2_without_any_bigram_is_zero():
    metric = DistinctN(2)
    metric.update(["meow"])
    assert metric.compute().item() == 0.0


def test_vocabulary_share_matches_whole_words_prefixes_and_phrases():
    metric = VocabularyShare(["purr*", "box", "free will"])
    metric.update(
        [
            "I am purring.",  # purr* prefix
            "A BOX!",  # case-insensitive whole word
            "boxes are lies",  # "box" is not a prefix entry: no match
            "Free   will is a treat",  # phrase, any whitespace
            "nothing here",
        ]
    )
    assert metric.compute().item() == pytest.approx(3 / 5)


def test_an_empty_vocabulary_is_refused():
    with pytest.raises(ValueError, match="at least one word"):
        VocabularyShare([" "])


def test_collection_routes_each_input_to_its_metric():
    metrics = GenerationMetrics()
    metrics.update(
        texts=["Meow. The void stares back.", "I want tuna."],
        num_tokens=[9, 5],
        stopped=[True, False],
    )
    values = {k: round(v.item(), 4) for k, v in metrics.compute().items()}
    assert values["gen/stopped_share"] == 0.5
    assert values["gen/mean_length"] == 7.0
    assert values["gen/cat_vocab_share"] == 1.0  # meow, tuna
    assert values["gen/existential_share"] == 0.5  # void
    assert values["gen/distinct_2"] == 1.0


def test_compute_from_records_with_custom_vocabularies():
    answers = [
        {"response": "the abyss", "num_tokens": 3, "stopped": True},
        {"response": "a nap", "num_tokens": 4, "stopped": True},
    ]
    got = compute_generation_metrics(answers, ["nap"], ["abyss", "void"])
    assert got["cat_vocab_share"] == 0.5 and got["existential_share"] == 0.5
    assert got["stopped_share"] == 1.0 and got["mean_length"] == 3.5
    assert got["distinct_2"] == 1.0  # (the abyss), (a nap): every bigram distinct
