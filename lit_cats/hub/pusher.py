"""Committing upload plans to the Hugging Face Hub: retries, background pushes, ``lit-cats push``.

:class:`HubPusher` sends one plan as one ``HfApi.create_commit``, so each push is atomic on the
Hub, creating the repo (and branch) first. Transient failures are retried with backoff
(:func:`call_with_retries`); :func:`is_retryable` tells them apart using only huggingface_hub's
own error types, so lit-cats does not depend on which HTTP client huggingface_hub uses.
Background pushes go through ``HfApi.run_as_future``: huggingface_hub's single worker thread
runs them one at a time, in order. :func:`push_run` pushes a finished run folder
(``lit-cats push``).

The token comes from ``HF_TOKEN`` or ``hf auth login``: ``huggingface_hub`` reads it per request
and nothing here ever holds, logs or writes it. ``HF_ENDPOINT`` selects another Hub.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

from lit_cats.errors import MissingFile
from lit_cats.hub.card import read_tensorboard_scalars, summarize_run, write_card
from lit_cats.hub.plans import CARD_FILENAME, UploadPlan, rerun_configs, run_plan, write_plan
from lit_cats.inference import ADAPTER_CONFIG, ADAPTER_DIRNAME
from lit_cats.inference.vllm import warn_unless_vllm_servable

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
T = TypeVar("T")


def is_retryable(exc: BaseException | None) -> bool:
    """Whether a push error is transient: no answer (network failure, timeout), 408, 429 or 5xx.

    ``huggingface_hub.errors.HTTPError`` is the root error of the HTTP client huggingface_hub
    uses (httpx in 1.x, httpx2 in 2.x), so its errors are classified without importing that
    client: an :class:`HfHubHTTPError` carries the Hub's answer and its status code, a
    transport failure carries none.
    """
    while exc is not None:  # huggingface_hub wraps LFS upload errors in RuntimeError
        if isinstance(exc, OfflineModeIsEnabled):
            return False  # HF_HUB_OFFLINE is a setting, not an outage: a retry cannot help
        if isinstance(exc, HfHubHTTPError):
            return exc.response.status_code in _RETRYABLE_STATUS
        if isinstance(exc, HTTPError):
            # A transport failure (refused, reset, timed out) has no answer; the client's own
            # status error has one.
            response = getattr(exc, "response", None)
            return response is None or response.status_code in _RETRYABLE_STATUS
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True  # storage backends outside the HTTP client (hf_xet) raise the builtins
        exc = exc.__cause__
    return False


def describe_failure(exc: BaseException | None) -> str:
    """One line saying why a push failed: "the Hub could not be reached" for a failure without
    an answer (no network, refused, timed out), else the error's type and first line."""
    if exc is None:
        return "no error"
    line = (str(exc).strip().splitlines() or [""])[0][:200]
    what = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    cause: BaseException | None = exc
    while cause is not None:
        answered = isinstance(cause, HfHubHTTPError)
        if not answered and isinstance(cause, (HTTPError, ConnectionError, TimeoutError)):
            return f"the Hub at {constants.ENDPOINT} could not be reached ({what})"
        cause = None if answered else cause.__cause__
    return what


def call_with_retries(fn: Callable[[], T], max_retries: int, backoff_s: float) -> T:
    """Call ``fn``, retrying transient errors with exponential backoff (``backoff_s * 2**i``)."""
    for attempt in range(max_retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == max_retries or not is_retryable(exc):
                raise
            delay = backoff_s * 2**attempt
            # INFO: a push that finally fails is reported once, by its caller, with the fix.
            log.info(
                f"Hub push failed ({describe_failure(exc)}); "
                f"retry {attempt + 1}/{max_retries} in {delay:.1f}s"
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def run_name(run_dir: Path) -> str:
    """Repo name for a run folder: the experiment name for ``<name>/version_N``, else the folder."""
    name = run_dir.parent.name if re.fullmatch(r"version_\d+", run_dir.name) else run_dir.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "lit-cats-adapter"


def push_command(run_dir: Path, repo_id: str, revision: str | None = None) -> str:
    """The shell command that pushes ``run_dir`` later (printed when a push fails)."""
    command = f"lit-cats push {run_dir} --repo_id {repo_id}"
    return command + (f" --revision {revision}" if revision else "")


class HubPusher:
    """Commits upload plans to one Hub repo, creating the repo (and branch) first.

    The Hub client is built with the pusher, so ``HF_ENDPOINT`` is read then; its background
    worker queues every :meth:`push_in_background` of this pusher.

    Args:
        repo_id: Target repo ``owner/name``, or a bare ``name`` under the logged-in user;
            ``None`` resolves ``<logged-in user>/<name>`` on first push.
        name: Repo name used when ``repo_id`` is ``None``.
        private: Create the repo private (an existing repo keeps its visibility).
        revision: Branch to commit to (created from ``main`` if missing); ``None`` is ``main``.
        dry_run_dir: Write each plan into this folder instead of uploading (no network).
        max_retries: Retries of a push that failed on a transient error.
        retry_backoff_s: First retry delay; doubles on each retry.
    """

    def __init__(
        self,
        repo_id: str | None,
        name: str,
        private: bool = False,
        revision: str | None = None,
        dry_run_dir: str | Path | None = None,
        max_retries: int = 3,
        retry_backoff_s: float = 2.0,
    ) -> None:
        if repo_id is not None and "/" not in repo_id:  # a bare name: the owner is whoever logs in
            repo_id, name = None, repo_id
        self.repo_id, self.name = repo_id, name
        self.private, self.revision = private, revision
        self.dry_run_dir = Path(dry_run_dir) if dry_run_dir is not None else None
        self.max_retries, self.retry_backoff_s = max_retries, retry_backoff_s
        self._api = HfApi()

    @property
    def display_repo_id(self) -> str:
        """The repo id, or a placeholder while it is not resolved yet."""
        return self.repo_id or f"<your-username>/{self.name}"

    def push(self, build_plan: Callable[[str], UploadPlan], message: str) -> str:
        """Build the plan for the resolved repo id and commit it; return the commit URL.

        ``build_plan`` receives the repo id because the model card names it.
        """
        if self.dry_run_dir is not None:
            write_plan(build_plan(self.display_repo_id), self.dry_run_dir)
            log.info(f"Dry run: wrote {message!r} to {self.dry_run_dir}")
            return str(self.dry_run_dir)
        return call_with_retries(
            lambda: self._push_once(build_plan, message), self.max_retries, self.retry_backoff_s
        )

    def push_in_background(
        self,
        build_plan: Callable[[str], UploadPlan],
        message: str,
        cleanup: Callable[[], None] | None = None,
    ) -> Future[str]:
        """Queue :meth:`push` (retries included) on ``HfApi.run_as_future`` and return its future.

        huggingface_hub runs the queue on one worker thread: pushes never block the caller and
        land one at a time, in the order queued. ``cleanup`` runs after the push, whatever its
        outcome; a future cancelled while queued runs neither.
        """

        def job() -> str:
            try:
                return self.push(build_plan, message)
            finally:
                if cleanup is not None:
                    cleanup()

        return self._api.run_as_future(job)

    def _push_once(self, build_plan: Callable[[str], UploadPlan], message: str) -> str:
        api = self._api
        if self.repo_id is None:
            self.repo_id = f"{api.whoami(cache=True)['name']}/{self.name}"
        # private=None keeps the account's default visibility rather than forcing "public".
        api.create_repo(self.repo_id, private=self.private or None, exist_ok=True)
        if self.revision:
            api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        plan = build_plan(self.repo_id)
        operations = [CommitOperationAdd(p, str(local)) for p, local in sorted(plan.items())]
        info = api.create_commit(
            self.repo_id, operations, commit_message=message, revision=self.revision
        )
        log.info(f"Pushed {message!r} to {info.commit_url}")
        return info.commit_url


def push_run(
    path: str,
    repo_id: str | None = None,
    private: bool = False,
    revision: str | None = None,
    dry_run_dir: str | None = None,
) -> None:
    """Push a finished run folder to the Hugging Face Hub.

    Uploads ``<path>/adapter`` (PEFT adapter + tokenizer), ``<path>/config.yaml`` and a model
    card with the last metrics logged to TensorBoard, as one commit. The token comes from
    ``HF_TOKEN`` or ``hf auth login``.

    Args:
        path: Run folder (e.g. ``logs/phi3-cats/version_0``) or its ``adapter`` folder.
        repo_id: Target repo; default ``<logged-in user>/<experiment name>``.
        private: Create the repo private (an existing repo keeps its visibility).
        revision: Branch to push to (created if missing); default ``main``.
        dry_run_dir: Write what would be uploaded into this folder instead of uploading.

    Raises:
        FileNotFoundError: If there is no adapter in the run folder.
    """
    run_dir = Path(path)
    if (run_dir / ADAPTER_CONFIG).is_file():
        run_dir = run_dir.parent
    adapter_dir = run_dir / ADAPTER_DIRNAME
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise MissingFile(
            f"No adapter in {adapter_dir} (adapter_config.json is missing). Pass a run folder "
            "written by `lit-cats fit` (e.g. logs/phi3-cats/version_0) whose training finished."
        )
    metrics, step = read_tensorboard_scalars(run_dir)
    warn_unless_vllm_servable(adapter_dir)
    summary = summarize_run(run_dir, adapter_dir, metrics, step)
    pusher = HubPusher(repo_id, run_name(run_dir), private, revision, dry_run_dir)
    # The card and the rerun config are written aside: the run folder is the record of the
    # run, and a dry run must leave it as it was.
    with tempfile.TemporaryDirectory(prefix="lit-cats-push-") as scratch:

        def build_plan(resolved_repo_id: str) -> UploadPlan:
            card = write_card(Path(scratch) / CARD_FILENAME, resolved_repo_id, summary)
            plan = rerun_configs(run_plan(run_dir, adapter_dir), Path(scratch))
            return {**plan, CARD_FILENAME: card}

        print(pusher.push(build_plan, f"Upload adapter from {run_dir}"))
        if dry_run_dir is None:  # the run folder keeps the card that is on the Hub
            shutil.copyfile(Path(scratch) / CARD_FILENAME, run_dir / CARD_FILENAME)
