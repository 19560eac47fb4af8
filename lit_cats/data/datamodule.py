"""The LightningDataModule: load a dataset, tokenize it once (cached), batch it by length."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from lit_cats.assets import SHIPPED_DATASET, SHIPPED_DATASET_ID
from lit_cats.data.collate import collate, pack_examples
from lit_cats.data.formatting import (
    IGNORE_INDEX,
    Format,
    detect_format,
    format_columns,
    tokenize_row,
    validate_column,
)
from lit_cats.data.prompts import Prompt, load_prompts
from lit_cats.data.sampling import (
    LengthGroupedSampler,
    ResumableDataLoader,
    TokenBudgetBatchSampler,
    data_parallel_size,
    shard_eval_sampler,
    shard_train_sampler,
    uses_distributed_sampler,
)
from lit_cats.errors import InvalidSetting, MissingFile
from lit_cats.locations import hub_errors, looks_like_path
from lit_cats.recipe import load_tokenizer

#: File suffix -> datasets builder name.
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


def load_raw_dataset(dataset: str, split: str = "train") -> datasets.Dataset:
    """Load a Hub dataset id, a local file or a folder of files as one ``datasets.Dataset``.

    Raises:
        FileNotFoundError: For a path that does not exist.
        ValueError: For an unsupported file type or an empty dataset.
        RuntimeError: When the Hub cannot be reached, with how to use a local file instead.
    """
    if dataset == SHIPPED_DATASET_ID:
        dataset = str(SHIPPED_DATASET)
    path = Path(dataset).expanduser()
    if path.exists():
        ds = _load_local(path, split)
    elif looks_like_path(dataset) or path.suffix in _BUILDERS:
        raise MissingFile(
            f"Dataset path {dataset!r} does not exist. Pass an existing file or folder "
            f"({', '.join(_BUILDERS)}), a Hub dataset id, or {SHIPPED_DATASET_ID!r} for the "
            "dataset shipped with lit-cats."
        )
    else:
        hint = f"point --data.dataset at a local file ({', '.join(_BUILDERS)})"
        with hub_errors("dataset", dataset, hint):
            ds = datasets.load_dataset(dataset, split=split)
    if len(ds) == 0:
        raise InvalidSetting(
            f"Dataset {dataset!r} has no rows; nothing to train on. Check the file (or the "
            "split) holds examples."
        )
    return ds


def _load_local(path: Path, split: str) -> datasets.Dataset:
    files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
    suffixes = {_BUILDERS.get(p.suffix) for p in files}
    if not files or None in suffixes or len(suffixes) > 1:
        raise InvalidSetting(
            f"Cannot read {str(path)!r}: expected one file, or a folder of files of one type, "
            f"with suffix {', '.join(_BUILDERS)}; found {[p.name for p in files][:5] or 'none'}."
        )
    builder = suffixes.pop()
    if all(p.stat().st_size == 0 for p in files):
        return datasets.Dataset.from_dict({})  # reported as empty by the caller
    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
    except datasets.exceptions.DatasetGenerationError as exc:
        raise InvalidSetting(
            f"Could not parse {str(path)!r} as {builder}: {exc.__cause__}"
        ) from exc
    except ValueError as exc:
        if "corresponds to no data" not in str(exc):
            raise
        return datasets.Dataset.from_dict({})  # an empty file: reported as empty by the caller


#: Share of truncated examples above which the data module warns (below it, it only informs).
TRUNCATION_WARN_SHARE = 0.10


def _rows(indices: list[int], shown: int = 5) -> str:
    """``"3, 17, 20 and 12 more"``: the first few row indices of a list."""
    more = len(indices) - shown
    return ", ".join(map(str, indices[:shown])) + (f" and {more} more" if more > 0 else "")


class CatsDataModule(L.LightningDataModule):
    """Loads, validates, tokenizes (cached) and batches a fine-tuning dataset.

    Args:
        dataset: Hub dataset id, local file/folder (json, jsonl, csv, parquet, txt), or
            ``"lit-cats/cat-memes"`` for the dataset shipped with lit-cats.
        tokenizer_name_or_path: Model whose tokenizer to use; linked from
            ``model.model_name_or_path`` by the CLI, so it is said once.
        format: ``"auto"`` (from the columns), ``"text"``, ``"messages"`` or
            ``"prompt_response"``.
        text_column: Column of plain text (the original's shape).
        messages_column: Column of chats (lists of ``{"role", "content"}``).
        prompt_column: Prompt column, used with ``response_column``.
        response_column: Response column, used with ``prompt_column``.
        train_on_prompt: Also compute the loss on system/user turns of chats.
        max_seq_length: Longer examples are truncated (and counted in the log).
        batch_size: Examples per device per step.
        val_size: Fraction of the rows held out for validation (0 disables validation).
        seed: Seed of the train/validation split and of the batch order.
        group_by_length: Batch examples of similar length together (less padding).
        pad_to_multiple_of: Round each batch's width up to this (8 suits tensor cores).
        num_workers: DataLoader worker processes.
        trust_remote_code: Let the tokenizer run code from its Hub repo. Off: Phi-3 needs none.
        packing: Train on padding-free packed rows: each step takes whole examples
            up to ``max_tokens_per_batch`` tokens instead of ``batch_size`` examples;
            position ids restart per example and attention stays inside each example.
            Validation is packed alike, in the dataset's order, on one process; under data
            parallelism its batches stay padded (each example on exactly one rank).
        max_tokens_per_batch: Token budget of one packed step (with ``packing``).
        pin_memory: Page-lock batches so the copy to the GPU does not stall the host.
        prompts: Prompts ``predict`` answers: user messages or chats (``lit_cats.data.prompts``).
        prompts_file: More prompts: a ``.txt`` file (one per line) or a ``.jsonl`` file of
            ``{"prompt": ...}`` or ``{"messages": [...]}`` objects.
        predict_batch_size: Prompts generated together by ``predict`` (left-padded).
    """

    def __init__(
        self,
        dataset: str = SHIPPED_DATASET_ID,
        tokenizer_name_or_path: str = "microsoft/Phi-3-mini-4k-instruct",
        format: Format = "auto",
        text_column: str = "text",
        messages_column: str = "messages",
        prompt_column: str = "prompt",
        response_column: str = "response",
        train_on_prompt: bool = False,
        max_seq_length: int = 512,
        batch_size: int = 2,
        val_size: float = 0.05,
        seed: int = 42,
        group_by_length: bool = True,
        pad_to_multiple_of: int = 1,
        num_workers: int = 0,
        trust_remote_code: bool = False,
        packing: bool = False,
        max_tokens_per_batch: int = 16384,
        pin_memory: bool = False,
        prompts: list[Prompt] | None = None,
        prompts_file: str | None = None,
        predict_batch_size: int = 8,
    ) -> None:
        super().__init__()
        if packing and max_tokens_per_batch < max_seq_length:
            raise InvalidSetting(
                f"max_tokens_per_batch={max_tokens_per_batch} is smaller than max_seq_length="
                f"{max_seq_length}: a packed step must hold the longest example."
            )
        if max_seq_length < 2:
            raise InvalidSetting(f"max_seq_length must be at least 2, got {max_seq_length}.")
        if batch_size < 1 or predict_batch_size < 1:
            raise InvalidSetting(
                f"batch_size and predict_batch_size must be at least 1, got {batch_size} and "
                f"{predict_batch_size}."
            )
        if not 0.0 <= val_size < 1.0:
            raise InvalidSetting(f"val_size is a fraction in [0, 1), got {val_size}.")
        self.save_hyperparameters()
        self.tokenizer = None
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self.predict_prompts: list[Prompt] = []
        self._train_loader: ResumableDataLoader | None = None
        self._train_loader_state: dict[str, int] | None = None  # from a checkpoint, to apply

    def setup(self, stage: str) -> None:
        """Load and tokenize once per process; ``datasets`` caches the tokenized rows on disk."""
        if stage == "predict":  # prompts only: the training data may not even be reachable
            self.predict_prompts = load_prompts(self.hparams.prompts, self.hparams.prompts_file)
            return
        if self.train_dataset is not None:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer_name_or_path, hp.trust_remote_code)
        raw = load_raw_dataset(hp.dataset)
        tokenized = self._tokenize(raw)
        self._report_truncation(tokenized)
        tokenized = self._drop_unlearnable(tokenized)
        if hp.val_size > 0 and len(tokenized) >= 2:
            split = tokenized.train_test_split(test_size=hp.val_size, seed=hp.seed)
            self.train_dataset, self.val_dataset = split["train"], split["test"]
        else:
            self.train_dataset, self.val_dataset = tokenized, None
        if stage == "fit":
            self._check_one_batch()
            rank_zero_info(self._start_report())

    def batches_per_epoch(self) -> int | None:
        """Training batches per epoch on each rank, known before any loader is built (the
        sampler pads the last global batch); ``None`` before ``setup`` or with packing."""
        if self.train_dataset is None or self.hparams.packing:
            return None
        per_step = self.hparams.batch_size * data_parallel_size(self.trainer)
        return math.ceil(len(self.train_dataset) / per_step)

    def _start_report(self) -> str:
        lines = [f"  effective batch size: {self._effective_batch_size()}"]
        if len(self.train_dataset):
            lines += ["  first training example:", self.describe_example(0)]
        return "\n".join(lines)

    def _effective_batch_size(self) -> str:
        trainer = self.trainer
        if self.hparams.packing:
            return f"up to {self.hparams.max_tokens_per_batch:,} tokens per device (packing)"
        factors = {"per device": self.hparams.batch_size}
        if trainer is not None:
            factors |= {
                "devices": trainer.num_devices,
                "nodes": trainer.num_nodes,
                "accumulation": trainer.accumulate_grad_batches,
            }
        total = math.prod(factors.values())
        return f"{total} = " + " x ".join(f"{v} {k}" for k, v in factors.items())

    def _tokenize(self, raw: datasets.Dataset) -> datasets.Dataset:
        hp = self.hparams
        names = (hp.text_column, hp.messages_column, hp.prompt_column, hp.response_column)
        fmt = detect_format(raw.column_names, hp.format, *names)
        for column in format_columns(*names)[fmt]:
            validate_column(raw[column], column, fmt)
        tok, max_len, on_prompt = self.tokenizer, hp.max_seq_length, hp.train_on_prompt

        def encode(row: dict[str, Any]) -> dict[str, Any]:
            example = tokenize_row(tok, row, fmt, names, max_len, on_prompt)
            # Tokens that carry a loss (the model shifts labels left, so position 0 never does).
            example["num_labels"] = sum(label != IGNORE_INDEX for label in example["labels"][1:])
            return example

        return raw.map(
            encode,
            remove_columns=raw.column_names,
            new_fingerprint=self._fingerprint(raw, fmt),
            desc="Tokenizing",
        )

    def _fingerprint(self, raw: datasets.Dataset, fmt: str) -> str:
        """Cache key of the tokenized dataset: the raw data, the tokenizer and every setting."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else str(self.tokenizer.get_vocab())
        parts = [raw._fingerprint, fmt, vocab, str(self.tokenizer.chat_template), "v3"]
        parts += [str(self.hparams[k]) for k in sorted(self.hparams)]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]

    def _report_truncation(self, tokenized: datasets.Dataset) -> None:
        """Count the truncated examples; warn when more than :data:`TRUNCATION_WARN_SHARE` are."""
        max_len = self.hparams.max_seq_length
        lengths = tokenized["num_tokens"]
        truncated = sum(n > max_len for n in lengths)
        if not truncated:
            return
        message = (
            f"{truncated} of {len(tokenized)} examples ({truncated / len(tokenized):.0%}) are "
            f"longer than max_seq_length={max_len} and were truncated (their end, and "
            "end-of-sequence, are not learned)."
        )
        if truncated > TRUNCATION_WARN_SHARE * len(tokenized):
            rank_zero_warn(
                f"{message} That is more than {TRUNCATION_WARN_SHARE:.0%}: raise "
                f"--data.max_seq_length (the longest example has {max(lengths)} tokens)."
            )
        else:
            rank_zero_info(message)

    def _drop_unlearnable(self, tokenized: datasets.Dataset) -> datasets.Dataset:
        """Leave out examples with no label token left after truncation; refuse if that is all.

        Such an example adds nothing to the loss, and a step made only of them divides zero by
        zero: a NaN loss that a run would otherwise train on, log and save.

        Raises:
            InvalidSetting: If no example has a token to learn from.
        """
        empty = [i for i, n in enumerate(tokenized["num_labels"]) if n == 0]
        if not empty:
            return tokenized
        max_len, rows = self.hparams.max_seq_length, _rows(empty)
        longest = max(tokenized["num_tokens"])
        fix = (
            f"Raise --data.max_seq_length (now {max_len}; the longest example has {longest} tokens)"
        )
        if not self.hparams.train_on_prompt:
            fix += ", or train on the prompts too with --data.train_on_prompt true"
        if len(empty) == len(tokenized):
            raise InvalidSetting(
                f"None of the {len(tokenized)} examples has a token to learn from within "
                f"max_seq_length={max_len}: truncation cuts off every answer (rows {rows}). "
                f"{fix}."
            )
        rank_zero_warn(
            f"{len(empty)} of {len(tokenized)} examples have no token to learn from within "
            f"max_seq_length={max_len} (rows {rows}) and are left out. {fix}."
        )
        keep = set(range(len(tokenized))) - set(empty)
        return tokenized.select(sorted(keep))

    def _check_one_batch(self) -> None:
        """Refuse, before the model loads, a training split smaller than one (global) batch.

        Raises:
            InvalidSetting: With the split's size, the batch's, and what to change.
        """
        if self.hparams.packing:
            return  # token-budget batches: any number of examples makes a step
        ranks = data_parallel_size(self.trainer)
        batch = self.hparams.batch_size * ranks
        if len(self.train_dataset) < batch:
            held_out = len(self.val_dataset) if self.val_dataset is not None else 0
            raise InvalidSetting(
                f"The training split has {len(self.train_dataset)} examples ({held_out} held "
                f"out for validation), fewer than one batch of {batch} "
                f"(data.batch_size {self.hparams.batch_size} x {ranks} devices). Add examples, "
                "or lower --data.batch_size (or --data.val_size)."
            )

    def _loader(self, ds: datasets.Dataset, train: bool) -> DataLoader:
        hp = self.hparams
        ds = ds.with_format(columns=["input_ids", "labels"])
        ranks = data_parallel_size(self.trainer)
        # Validation is packed too on one process (a padded batch of 2 is host-bound: ~6x the
        # time); under data parallelism it keeps the padded loader, which gives each example
        # to exactly one rank (the token-budget batches are cut to an equal count per rank).
        if hp.packing and (train or ranks == 1):
            return self._packed_loader(ds, train)
        sampler: Sampler[int] | None
        if train:
            lengths = [len(x) for x in ds["input_ids"]]
            # One global order, identical on every rank, grouped by the step's global batch;
            # each rank then takes its round-robin share (lit_cats/data/sampling.py).
            sampler = LengthGroupedSampler(
                lengths, hp.batch_size * ranks, hp.seed, hp.group_by_length
            )
            sampler = shard_train_sampler(sampler, self.trainer)
        else:
            sampler = shard_eval_sampler(ds, self.trainer)
        return ResumableDataLoader(
            ds,
            batch_size=hp.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
            trainer=self.trainer if train else None,  # step token counts when accumulating
        )

    def _packed_loader(self, ds: datasets.Dataset, train: bool = True) -> DataLoader:
        """Token-budget batches packed into one padding-free row (``lit_cats.fast.attention``);
        for validation (``train=False``, one process) in the dataset's order, every example."""
        hp, trainer = self.hparams, self.trainer
        ranks = data_parallel_size(trainer)
        if train and ranks > 1 and uses_distributed_sampler(trainer):
            raise InvalidSetting(
                "data.packing shards its token-budget batches by rank itself; set "
                "--trainer.use_distributed_sampler false so Lightning does not replace it."
            )
        sampler = TokenBudgetBatchSampler(
            [len(x) for x in ds["input_ids"]],
            hp.max_tokens_per_batch,
            seed=hp.seed,
            shuffle=train,
            num_replicas=ranks,
            rank=trainer.global_rank if ranks > 1 else 0,
        )
        return ResumableDataLoader(
            ds,
            batch_sampler=sampler,
            collate_fn=pack_examples,
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory,
            trainer=trainer if train else None,  # step token counts when accumulating
        )

    def collate(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a list of tokenized examples into tensors (see :func:`collate`)."""
        return collate(batch, self.tokenizer.pad_token_id, self.hparams.pad_to_multiple_of)

    def predict_dataloader(self) -> DataLoader:
        """Batches of prompts, as given (the model tokenizes them with its chat template)."""
        return DataLoader(
            self.predict_prompts, batch_size=self.hparams.predict_batch_size, collate_fn=list
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_dataset, train=True)
        if self._train_loader_state is not None:
            loader.load_state_dict(self._train_loader_state)
            self._train_loader_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: how far the training loader got in its epoch."""
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume, make the next training loader skip the batches the run already saw.

        Lightning restores a stateful loader only if it builds the loader after the restore.
        It builds it before whenever ``configure_optimizers`` asks for
        ``trainer.estimated_stepping_batches`` with ``max_epochs`` set (our schedulers do), and
        then silently restarts the epoch (Lightning-AI/pytorch-lightning#20550). This hook
        runs before that, so the loader starts out in the right place.
        """
        self._train_loader_state = state_dict.get("train_loader")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_dataset, train=False) if self.val_dataset else []

    def describe_example(self, index: int = 0) -> str:
        """One training example decoded, with the trained-on part marked, for the start report."""
        ex = self.train_dataset[index]
        ids, labels = ex["input_ids"], ex["labels"]
        masked = [i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]
        trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
        return (
            f"  input ({len(ids)} tokens): {self.tokenizer.decode(ids)!r}\n"
            f"  masked from the loss ({len(masked)} tokens): "
            f"{self.tokenizer.decode(masked)!r}\n"
            f"  trained on ({len(trained)} tokens): {self.tokenizer.decode(trained)!r}"
        )
