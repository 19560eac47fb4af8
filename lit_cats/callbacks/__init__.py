"""Callbacks for lit-cats runs, one per file."""

from lit_cats.callbacks.hub_push import HubPushCallback
from lit_cats.callbacks.throughput import TokenThroughput

__all__ = ["HubPushCallback", "TokenThroughput"]
