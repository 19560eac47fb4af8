"""Data files shipped with lit-cats: the original existential cat-meme dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Chat-shaped JSONL (``{"messages": [...]}`` per line), written for lit-cats.
SHIPPED_DATASET = Path(__file__).with_name("cat_memes.jsonl")

#: Reserved dataset name that resolves to :data:`SHIPPED_DATASET` (never a Hub lookup).
SHIPPED_DATASET_ID = "lit-cats/cat-memes"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file into a list of dicts (blank lines are skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
