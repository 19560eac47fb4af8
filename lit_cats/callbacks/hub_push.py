"""Pushes the adapter (and, by strategy, each checkpoint) to the Hugging Face Hub."""

from __future__ import annotations

import contextlib
import re
import shutil
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_cats.errors import InvalidSetting
from lit_cats.hub import (
    CARD_FILENAME,
    CHECKPOINT_FILENAME,
    CONFIG_FILENAME,
    HubPusher,
    RunSummary,
    UploadPlan,
    checkpoint_plan,
    describe_failure,
    push_command,
    rerun_configs,
    run_name,
    run_plan,
    summarize_run,
    write_card,
)
from lit_cats.inference import ADAPTER_CONFIG, ADAPTER_DIRNAME

#: Folder of a run where each push's files wait for their upload (removed after it).
STAGING_DIRNAME = ".hub-staging"

Strategy = Literal["end", "every_save", "checkpoint"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


class HubPushCallback(L.Callback):
    """Push the trained LoRA adapter to the Hugging Face Hub without ever costing the run.

    Each push is one commit of the adapter and tokenizer (PEFT format), the resolved
    ``config.yaml`` and a generated model card. Uploads run in the background, one at a time
    and in order, on huggingface_hub's worker thread (``HfApi.run_as_future``); network
    errors, rate limits and 5xx answers are retried with backoff; ``fit`` waits for them at the
    end (bounded by ``timeout_s``) and a push that still fails only warns, naming the local
    adapter and the ``lit-cats push`` command that uploads it later. Rank zero only. The token
    comes from ``HF_TOKEN`` or ``hf auth login``, never from the config.

    Example (``lit-cats`` exposes it as the top-level ``hub:`` section of a config; in a plain
    LightningCLI list it under ``trainer.callbacks`` with ``class_path``)::

        hub:
          repo_id: null        # <logged-in user>/<experiment name>
          strategy: checkpoint
          private: false

    Args:
        repo_id: Target repo ``owner/name``, or a bare ``name`` under the logged-in user;
            ``None`` uses ``<logged-in user>/<run name>``, the run name being the logger's
            experiment name.
        strategy: ``"end"`` pushes the final adapter only; ``"every_save"`` also commits the
            adapter at each checkpoint; ``"checkpoint"`` does too and keeps the latest
            resumable checkpoint in the repo's ``last-checkpoint/`` folder.
        private: Create the repo private (an existing repo keeps its visibility).
        revision: Branch to push to (created from ``main`` if missing); ``None`` is ``main``.
        dry_run_dir: Write what would be uploaded into this folder instead (no network).
        max_retries: Retries of a push that failed on a network error, 5xx or rate limit.
        retry_backoff_s: Delay before the first retry; doubles on each retry.
        timeout_s: Longest wait for pending uploads at the end of ``fit``.
        enabled: ``False`` turns pushing off (``--hub.enabled false``) and keeps the settings.
    """

    def __init__(
        self,
        repo_id: str | None = None,
        strategy: Strategy = "end",
        private: bool = False,
        revision: str | None = None,
        dry_run_dir: str | None = None,
        max_retries: int = 3,
        retry_backoff_s: float = 2.0,
        timeout_s: float = 600.0,
        enabled: bool = True,
    ) -> None:
        if strategy not in STRATEGIES:
            raise InvalidSetting(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
        if repo_id is not None and (repo_id.count("/") > 1 or not repo_id.strip("/")):
            raise InvalidSetting(f"repo_id must look like 'owner/name' or 'name', got {repo_id!r}.")
        if max_retries < 0 or retry_backoff_s < 0 or timeout_s <= 0:
            raise InvalidSetting(
                "max_retries and retry_backoff_s must be >= 0 and timeout_s > 0, got "
                f"{max_retries}, {retry_backoff_s} and {timeout_s}."
            )
        self.repo_id, self.strategy, self.private = repo_id, strategy, private
        self.revision, self.dry_run_dir = revision, dry_run_dir
        self.max_retries, self.retry_backoff_s = max_retries, retry_backoff_s
        self.timeout_s = timeout_s
        self.enabled = enabled
        self._pusher: HubPusher | None = None  # set on rank zero from setup to the end of fit
        self._futures: list[Future[str]] = []
        self._run_dir = Path()
        self._save_pending = False

    # ------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        log_dir = trainer.log_dir  # a broadcast: every rank must ask, not only rank zero
        if not callable(getattr(pl_module, "save_adapter", None)):
            raise TypeError(
                f"HubPushCallback needs a LightningModule with save_adapter(path) (such as "
                f"lit_cats.model.QLoRAModule), got {type(pl_module).__name__}."
            )
        if not trainer.is_global_zero:
            return
        self._run_dir = Path(log_dir or trainer.default_root_dir)
        remove_stale_staging(self._run_dir)
        self._pusher = HubPusher(
            self.repo_id,
            run_name(self._run_dir),
            self.private,
            self.revision,
            self.dry_run_dir,
            self.max_retries,
            self.retry_backoff_s,
        )
        self._futures = []

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The file is written after every on_save_checkpoint hook returns, so only note it here
        # and push from the next hook (see _push_pending_checkpoint).
        if self._pusher is not None and self.strategy != "end":
            self._save_pending = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._push_pending_checkpoint(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._push_pending_checkpoint(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._push_pending_checkpoint(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after every on_train_end hook, so the module's final adapter is on disk.
        if self._pusher is None:
            return
        try:
            final = self._submit_final(trainer, pl_module)
        except Exception as exc:  # a push problem must never fail a finished run
            rank_zero_warn(self._failure_message(f"could not be prepared ({exc!r})"))
            final = None
        self._finish(final)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._pusher is not None:
            self._finish(None)

    # ------------------------------------------------------------------------------ pushes
    def _push_pending_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._save_pending or self._pusher is None:
            return
        self._save_pending = False
        try:
            staging = self._staging_dir(f"step-{trainer.global_step}")
            plan = self._checkpoint_files(trainer, pl_module, staging)
        except Exception as exc:  # skip this checkpoint's push; training goes on
            rank_zero_warn(
                f"Skipped the Hub push of the step {trainer.global_step} checkpoint: {exc!r}"
            )
            return
        summary = self._summary(trainer, staging / ADAPTER_DIRNAME)
        self._submit(
            plan,
            staging / CARD_FILENAME,
            summary,
            f"Training in progress, step {trainer.global_step}",
            staging,
        )

    def _submit_final(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Future[str]:
        adapter_dir = self._run_dir / ADAPTER_DIRNAME
        if not (adapter_dir / ADAPTER_CONFIG).is_file():
            # The module writes it in on_train_end; export it here if it did not, so the run
            # never ends without its adapter on disk.
            _save_adapter(pl_module, adapter_dir)
        plan = run_plan(self._run_dir, adapter_dir)
        staging = self._staging_dir(f"final-step-{trainer.global_step}")
        if self._save_pending and self.strategy == "checkpoint":
            plan |= self._last_checkpoint_files(trainer, adapter_dir, staging)
        self._save_pending = False
        summary = self._summary(trainer, adapter_dir)
        return self._submit(
            plan, self._run_dir / CARD_FILENAME, summary, "End of training", staging
        )

    def _checkpoint_files(
        self, trainer: L.Trainer, pl_module: L.LightningModule, staging: Path
    ) -> UploadPlan:
        # Export now: the weights change with the next optimizer step, while the upload waits.
        adapter_dir = _save_adapter(pl_module, staging / ADAPTER_DIRNAME)
        plan = run_plan(self._run_dir, adapter_dir)
        if self.strategy == "checkpoint":
            plan |= self._last_checkpoint_files(trainer, adapter_dir, staging)
        return plan

    def _last_checkpoint_files(
        self, trainer: L.Trainer, adapter_dir: Path, staging: Path
    ) -> UploadPlan:
        source = latest_checkpoint(trainer)
        if source is None:
            rank_zero_warn(
                "strategy='checkpoint' found no checkpoint file to push; pushing the adapter only."
            )
            return {}
        # Copy now: ModelCheckpoint deletes old files (save_top_k) and rewrites last.ckpt in place.
        checkpoint = Path(shutil.copyfile(source, staging / CHECKPOINT_FILENAME))
        return checkpoint_plan(adapter_dir, checkpoint, self._run_dir / CONFIG_FILENAME)

    def _submit(
        self,
        plan: UploadPlan,
        card_path: Path,
        summary: RunSummary,
        message: str,
        staging: Path,
    ) -> Future[str]:
        assert self._pusher is not None

        def build_plan(repo_id: str) -> UploadPlan:
            # config.yaml as a rerun: a resumed run's own holds its ckpt_path
            files = rerun_configs(plan, staging / "rerun")
            return {**files, CARD_FILENAME: write_card(card_path, repo_id, summary)}

        def remove_staging() -> None:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):  # the last one out removes the parent
                staging.parent.rmdir()

        future = self._pusher.push_in_background(build_plan, message, remove_staging)
        self._futures.append(future)
        return future

    def _summary(self, trainer: L.Trainer, adapter_dir: Path) -> RunSummary:
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if isinstance(value, torch.Tensor) and value.numel() == 1
        }
        resumable = self.strategy == "checkpoint"
        return summarize_run(self._run_dir, adapter_dir, metrics, trainer.global_step, resumable)

    def _staging_dir(self, name: str) -> Path:
        path = self._run_dir / STAGING_DIRNAME / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    # ------------------------------------------------------------------------------ outcome
    def _finish(self, final: Future[str] | None) -> None:
        """Wait (bounded) for the uploads, report the outcome, stop pushing."""
        done, pending = wait(self._futures, timeout=self.timeout_s)
        # Queued pushes are dropped; a running one cannot be interrupted and finishes (or
        # fails) before the process exits.
        for future in pending:
            future.cancel()
        checkpoints = [f for f in self._futures if f in done and f is not final]  # in push order
        failed = [f for f in checkpoints if f.exception() is not None]
        final_ok = final is None or self._report_final(final, final in done, len(failed))
        if failed and final_ok:  # else the final push's warning says it: one warning in all
            rank_zero_warn(
                f"{len(failed)} checkpoint push(es) to the Hub failed "
                f"({describe_failure(failed[-1].exception())})."
            )
        self._pusher, self._futures = None, []

    def _report_final(self, final: Future[str], done: bool, failed_checkpoints: int) -> bool:
        """Report the final push; False when it failed (the warning then says it all)."""
        also = f" (as did {failed_checkpoints} checkpoint push(es))" if failed_checkpoints else ""
        if not done:
            reason = f"did not finish within {self.timeout_s}s (it goes on until the process exits)"
            rank_zero_warn(self._failure_message(reason + also))
            return False
        if final.exception() is not None:
            reason = f"failed{also}: {describe_failure(final.exception())}"
            rank_zero_warn(self._failure_message(reason))
            return False
        if self.dry_run_dir is not None:
            rank_zero_info(f"Dry run: wrote what the Hub push would upload to {final.result()}")
        else:
            rank_zero_info(f"Pushed the adapter to the Hugging Face Hub: {final.result()}")
        return True

    def _failure_message(self, reason: str) -> str:
        assert self._pusher is not None
        command = push_command(self._run_dir, self._pusher.display_repo_id, self.revision)
        return (
            f"The Hub push of the final adapter {reason}. Training is complete and the adapter "
            f"is safe at {self._run_dir / ADAPTER_DIRNAME}. Push it later with:\n  {command}"
        )


def remove_stale_staging(run_dir: Path) -> None:
    """Remove staging folders that earlier runs of this experiment left behind.

    A push removes its staging folder once done; a run killed while pushing leaves its copies
    (adapters, a whole checkpoint) behind. A new run of the experiment removes them, in every
    ``version_N`` of it, and in its own folder when resuming into it. Two runs of one
    experiment pushing at the same time would remove each other's: give them their own names.
    """
    if re.fullmatch(r"version_\d+", run_dir.name):
        folders = list(run_dir.parent.glob(f"version_*/{STAGING_DIRNAME}"))
    else:
        folders = [run_dir / STAGING_DIRNAME]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _save_adapter(pl_module: L.LightningModule, path: Path) -> Path:
    """Export the PEFT adapter + tokenizer (``save_adapter`` was checked in ``setup``)."""
    return Path(pl_module.save_adapter(path))  # type: ignore[operator]


def latest_checkpoint(trainer: L.Trainer) -> Path | None:
    """The checkpoint file that ModelCheckpoint wrote last, if any."""
    paths = {
        Path(path)
        for callback in trainer.checkpoint_callbacks
        for path in (
            getattr(callback, "last_model_path", ""),
            getattr(callback, "best_model_path", ""),
        )
        if path
    }
    existing = [path for path in paths if path.is_file()]
    return max(existing, key=lambda path: path.stat().st_mtime_ns, default=None)
