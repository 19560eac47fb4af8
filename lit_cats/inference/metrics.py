"""torchmetrics metrics over generated answers: stopping, length, diversity, and vocabulary.

The original project judged answers by eye for two things: do they sound like a cat meme, and
are they existential. :class:`VocabularyShare` makes both measurable with word lists. Whether an
answer ends by itself (:class:`StoppedShare`) catches the commonest fine-tuning failure: a model
that never learned to emit its end marker and rambles to the token limit.

All states are tensors summed (or concatenated) across processes, so the metrics are correct
under DDP. Update them together through :class:`GenerationMetrics`::

    metrics = GenerationMetrics()
    metrics.update(texts=["Meow. The void stares back."], num_tokens=[9], stopped=[True])
    metrics.compute()  # {"gen/stopped_share": 1.0, "gen/cat_vocab_share": 1.0, ...}
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics import Metric, MetricCollection

#: Words of the cat-meme register (``*`` marks a prefix: ``purr*`` matches "purring").
CAT_WORDS = (
    "cat*", "kitt*", "meow*", "purr*", "paw*", "whisker*", "tail*", "fur", "furry", "nap*",
    "tuna", "treat*", "kibble", "catnip", "litter", "yarn", "laser", "box*", "hooman*", "human*",
    "zoomies", "knead*", "hiss*", "scratch*", "mouse", "mice", "bird*", "fish*", "nine lives",
)  # fmt: skip
#: Words of the existential register.
EXISTENTIAL_WORDS = (
    "existential*", "exist*", "meaning*", "purpose*", "void", "absurd*", "nothing*",
    "mortal*", "death", "die", "dying", "eternal*", "eternity", "infinite", "infinity",
    "universe", "cosmic", "cosmos", "conscious*", "being", "soul*", "dread", "angst",
    "freedom", "free will", "despair", "futil*", "ephemeral", "transient", "oblivion",
    "philosoph*", "sartre", "camus", "nietzsche", "kierkegaard", "sisyph*", "life",
)  # fmt: skip

_WORD = re.compile(r"[\w']+")


class _MeanPerAnswer(Metric):
    """Mean of a per-answer value over every answer seen (0 before any); summed across ranks.

    Not torchmetrics' ``MeanMetric``: it returns NaN, with a warning, before any answer.
    """

    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("value_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("answers", torch.tensor(0.0), dist_reduce_fx="sum")

    def _add(self, values: Sequence[float]) -> None:
        self.value_sum += float(sum(values))
        self.answers += len(values)

    def compute(self) -> torch.Tensor:
        return self.value_sum / self.answers.clamp(min=1)


class StoppedShare(_MeanPerAnswer):
    """Share of answers that ended with a stop token before the token limit."""

    higher_is_better = True

    def update(self, stopped: Sequence[bool]) -> None:
        self._add([bool(s) for s in stopped])


class MeanAnswerLength(_MeanPerAnswer):
    """Mean number of generated tokens per answer (the end marker included)."""

    def update(self, num_tokens: Sequence[int]) -> None:
        self._add(num_tokens)


class DistinctN(Metric):
    """Distinct-n (Li et al., 2016): distinct word n-grams over all n-grams of all answers.

    Near 1: varied answers; near 0: the model repeats itself, within and across answers. Words
    are lower-cased ``\\w+`` runs. N-grams are kept as 63-bit hashes so the state is a tensor
    that can be gathered across processes.

    Args:
        n: The n-gram order (2 for distinct-2).
    """

    higher_is_better = True
    full_state_update = False

    def __init__(self, n: int = 2, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        self.n = n
        self.add_state("ngrams", [], dist_reduce_fx="cat")

    def update(self, texts: Sequence[str]) -> None:
        hashes = [_hash(gram) for text in texts for gram in ngrams(words(text), self.n)]
        self.ngrams.append(torch.tensor(hashes, dtype=torch.long, device=self.device))

    def compute(self) -> torch.Tensor:
        # A list of per-update tensors here, one tensor after a cross-process sync.
        grams = self.ngrams
        if isinstance(grams, list):
            grams = torch.cat(grams) if grams else torch.zeros(0, dtype=torch.long)
        if grams.numel() == 0:
            return torch.tensor(0.0, device=self.device)
        return torch.unique(grams).numel() / torch.tensor(float(grams.numel()), device=self.device)


class VocabularyShare(_MeanPerAnswer):
    """Share of answers that use at least one word (or phrase) of a vocabulary.

    Matching is case-insensitive on whole words; an entry ending in ``*`` matches any word that
    starts with it (``purr*``: purr, purrs, purring).

    Args:
        vocabulary: The words and phrases.
    """

    higher_is_better = True

    def __init__(self, vocabulary: Sequence[str], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.pattern = vocabulary_pattern(vocabulary)

    def update(self, texts: Sequence[str]) -> None:
        self._add([self.pattern.search(text) is not None for text in texts])


class GenerationMetrics(MetricCollection):
    """All generation metrics, updated together (each takes the inputs it needs).

    Args:
        cat_words: Vocabulary of ``cat_vocab_share``.
        existential_words: Vocabulary of ``existential_share``.
        prefix: Prepended to every metric name (a TensorBoard section).
        sync_on_compute: Reduce across processes in ``compute`` (every rank must call it).
            False when one rank computes alone, or it would wait for the others forever.
    """

    def __init__(
        self,
        cat_words: Sequence[str] = CAT_WORDS,
        existential_words: Sequence[str] = EXISTENTIAL_WORDS,
        prefix: str = "gen/",
        sync_on_compute: bool = True,
    ) -> None:
        kw = {"sync_on_compute": sync_on_compute}
        super().__init__(
            {
                "stopped_share": StoppedShare(**kw),
                "mean_length": MeanAnswerLength(**kw),
                "distinct_2": DistinctN(2, **kw),
                "cat_vocab_share": VocabularyShare(cat_words, **kw),
                "existential_share": VocabularyShare(existential_words, **kw),
            },
            prefix=prefix,
            compute_groups=False,  # the metrics take different inputs
        )


def compute_generation_metrics(
    answers: Sequence[Mapping[str, Any]],
    cat_words: Sequence[str] = CAT_WORDS,
    existential_words: Sequence[str] = EXISTENTIAL_WORDS,
    device: torch.device | str = "cpu",
    sync: bool = True,
) -> dict[str, float]:
    """Every metric over answer records (``response``, ``num_tokens``, ``stopped``).

    With ``sync`` and ``torch.distributed`` initialised, reduced across processes: then every
    rank must call it, with ``device`` its own (NCCL gathers only GPU tensors).
    """
    metrics = GenerationMetrics(cat_words, existential_words, "", sync).to(device)
    metrics.update(
        texts=[a["response"] for a in answers],
        num_tokens=[a["num_tokens"] for a in answers],
        stopped=[a["stopped"] for a in answers],
    )
    return {name: round(float(value), 4) for name, value in metrics.compute().items()}


def words(text: str) -> list[str]:
    """Lower-cased words of ``text``."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """Consecutive ``n``-tuples of ``tokens`` (``nltk.util.ngrams``, without the dependency)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def vocabulary_pattern(vocabulary: Sequence[str]) -> re.Pattern[str]:
    """A regex matching any entry of ``vocabulary`` as a whole word (``*``: as a prefix)."""
    entries = [w.strip().lower() for w in vocabulary if w.strip()]
    if not entries:
        raise ValueError("A vocabulary needs at least one word.")
    parts = [
        re.escape(w[:-1]) + r"\w*" if w.endswith("*") else re.escape(w).replace(r"\ ", r"\s+")
        for w in entries
    ]
    return re.compile(r"\b(?:" + "|".join(parts) + r")\b", re.IGNORECASE)


def _hash(gram: tuple[str, ...]) -> int:
    # Stable across processes (Python's hash() is salted per process), so DDP ranks agree.
    digest = hashlib.blake2b("\x00".join(gram).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
