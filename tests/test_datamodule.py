"""The data module: loading files and Hub ids, splitting, batching, resuming, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_cats.assets import SHIPPED_DATASET, read_jsonl
from lit_cats.data.datamodule import CatsDataModule, load_raw_dataset
from lit_cats.tiny import TINY_MODEL_ID


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_shipped_dataset_is_chat_shaped_and_large_enough():
    rows = read_jsonl(SHIPPED_DATASET)
    assert len(rows) >= 300
    assert len({r["messages"][-1]["content"] for r in rows}) == len(rows)
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)


def _input_ids(loader) -> list[list[int]]:
    return [b["input_ids"].tolist() for b in loader]


def _setup(dataset: str, **kwargs) -> CatsDataModule:
    dm = CatsDataModule(dataset=dataset, tokenizer_name_or_path=TINY_MODEL_ID, **kwargs)
    dm.setup("fit")
    return dm


def test_datamodule_splits_and_batches_the_shipped_dataset(tiny_path):
    dm = _setup("lit-cats/cat-memes", batch_size=4, val_size=0.1)
    assert len(dm.train_dataset) + len(dm.val_dataset) == len(read_jsonl(SHIPPED_DATASET))
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape[0] == 4
    # Same seed, same split.
    again = _setup("lit-cats/cat-memes", batch_size=4, val_size=0.1)
    assert again.val_dataset["input_ids"] == dm.val_dataset["input_ids"]


def test_text_csv_and_prompt_response_files_load(tiny_path, tmp_path):
    (tmp_path / "t.csv").write_text('text\n"I can haz void"\n"Teh box iz all"\n')
    dm = _setup(str(tmp_path / "t.csv"), val_size=0.0)
    assert dm.val_dataset is None and len(dm.train_dataset) == 2
    rows = [{"prompt": "Why?", "response": "Void."}, {"prompt": "Food?", "response": "Nom."}]
    dm = _setup(_write_jsonl(tmp_path / "pr.jsonl", rows), val_size=0.0)
    ex = dm.train_dataset[0]
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100]
    assert dm.tokenizer.decode(trained).endswith("<|end|>\n<|endoftext|>")
    assert len(trained) < len(ex["input_ids"])


def test_custom_text_column(tiny_path, tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"quote": "Meow."}, {"quote": "Void."}])
    dm = _setup(path, text_column="quote", val_size=0.0)
    assert len(dm.train_dataset) == 2


def test_missing_path_names_the_fix(tiny_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*lit-cats/cat-memes"):
        _setup("./no/such/file.jsonl")


def test_missing_column_lists_existing_columns(tiny_path, tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"body": "a"}, {"body": "b"}])
    with pytest.raises(ValueError, match=r"columns are \['body'\].*--data.text_column"):
        _setup(path)


@pytest.mark.parametrize(("name", "content"), [("empty.csv", "text\n"), ("empty.jsonl", "")])
def test_empty_dataset_is_refused(tiny_path, tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match="has no rows"):
        load_raw_dataset(str(tmp_path / name))


def test_non_string_values_are_named(tiny_path, tmp_path):
    path = _write_jsonl(tmp_path / "n.jsonl", [{"text": "ok"}, {"text": 7}])
    with pytest.raises(ValueError, match="row 1 holds int"):
        _setup(path)


def test_malformed_chat_is_named(tiny_path, tmp_path):
    rows = [{"messages": [{"role": "cat", "content": "meow"}]}]
    with pytest.raises(ValueError, match="row 0 is not a chat"):
        _setup(_write_jsonl(tmp_path / "c.jsonl", rows))


def test_unreachable_hub_says_how_to_use_a_local_file(tiny_path):
    # conftest sets HF_HUB_OFFLINE=1: the Hub is unreachable, as on an air-gapped machine.
    with pytest.raises(RuntimeError, match="Could not load dataset.*local file"):
        load_raw_dataset("leonvanbokhorst/existential-cat-memes-v1")


def test_tokenization_is_cached(tiny_path):
    dm = _setup("lit-cats/cat-memes")
    fingerprint = dm.train_dataset._fingerprint
    again = _setup("lit-cats/cat-memes")
    assert again.train_dataset._fingerprint == fingerprint
    assert again.train_dataset.cache_files  # read back from the on-disk cache


def test_datamodule_checkpoints_the_loader_position_for_the_next_loader(tiny_path):
    # Lightning restores loaders built after the restore only; ours is built before
    # (estimated_stepping_batches, Lightning-AI/pytorch-lightning#20550), so the datamodule
    # carries the position to the next loader it builds.
    dm = _setup("lit-cats/cat-memes", batch_size=8)
    straight = _input_ids(dm.train_dataloader())
    loader = dm.train_dataloader()
    for _, _ in zip(range(3), loader, strict=False):
        pass
    state = dm.state_dict()
    assert state == {"train_loader": {"batches_served": 3}}

    resumed = _setup("lit-cats/cat-memes", batch_size=8)
    resumed.load_state_dict(state)
    assert _input_ids(resumed.train_dataloader()) == straight[3:]
    assert _input_ids(resumed.train_dataloader()) == straight  # applied once, then a new epoch


def test_a_checkpoint_at_the_end_of_an_epoch_does_not_skip_the_next(tiny_path):
    dm = _setup("lit-cats/cat-memes", batch_size=8)
    loader = dm.train_dataloader()
    everything = _input_ids(loader)
    loader.load_state_dict(loader.state_dict())  # served the whole epoch
    assert _input_ids(loader) == everything


def _chats(path: Path, prompt_words: list[int], answer_words: list[int] | None = None) -> str:
    """One chat per entry: a user prompt of that many words, then an answer (of 2 words, or
    of ``answer_words``)."""
    answers = answer_words or [2] * len(prompt_words)
    rows = [
        {
            "messages": [
                {"role": "user", "content": " ".join(["meow"] * n) + "?"},
                {"role": "assistant", "content": " ".join(["void"] * a) + "."},
            ]
        }
        for n, a in zip(prompt_words, answers, strict=True)
    ]
    return _write_jsonl(path, rows)


def test_many_truncated_examples_warn_with_the_share_and_the_setting(tiny_path):
    with pytest.warns(UserWarning, match=r"\(\d+%\) are longer than max_seq_length=40") as warned:
        _setup("lit-cats/cat-memes", max_seq_length=40)
    message = next(str(w.message) for w in warned if "truncated" in str(w.message))
    assert "more than 10%: raise --data.max_seq_length (the longest example has" in message


def test_a_few_truncated_examples_only_inform(tiny_path, tmp_path, recwarn):
    path = _chats(tmp_path / "c.jsonl", [2] * 20, [2] * 19 + [60])  # 1 of 20 (5%) too long
    dm = _setup(path, max_seq_length=40, val_size=0.0)
    assert len(dm.train_dataset) == 20  # its answer survives: kept
    assert not [w for w in recwarn if "truncated" in str(w.message)]


def test_examples_with_nothing_left_to_learn_are_left_out(tiny_path, tmp_path):
    path = _chats(tmp_path / "c.jsonl", [2, 60, 2, 2, 60, 2])  # rows 1 and 4: answer cut off
    with pytest.warns(UserWarning, match=r"2 of 6 examples have no token to learn from"):
        dm = _setup(path, max_seq_length=24, val_size=0.0)
    assert len(dm.train_dataset) == 4
    assert all(n > 0 for n in dm.train_dataset["num_labels"])


def test_batches_per_epoch_is_known_before_the_loader(tiny_path):
    dm = _setup("lit-cats/cat-memes", batch_size=8)
    assert dm.batches_per_epoch() == len(list(dm.train_dataloader()))


def test_packed_validation_batches_hold_every_example_once_in_order(tiny_path):
    dm = _setup("lit-cats/cat-memes", val_size=0.1, packing=True, max_tokens_per_batch=1024)
    batches = list(dm.val_dataloader())
    assert len(batches) < len(dm.val_dataset) / 4  # a few packed rows, not padded pairs
    assert all(b["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in b for b in batches)
    tokens = [t for b in batches for t in b["input_ids"][0].tolist()]
    assert tokens == [t for ids in dm.val_dataset["input_ids"] for t in ids]
