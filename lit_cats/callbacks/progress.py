"""Progress a person can follow: a whole-run bar, plain lines in logs, and an end summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from lit_cats.inference.adapters import ADAPTER_DIRNAME
from lit_cats.loss import label_token_count

#: The tags the progress lines and the summary read (what the module and callbacks log).
TRAIN_LOSS, VAL_LOSS, GRAD_NORM = "loss/train", "loss/val", "optim/grad_norm"


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _total_steps(trainer: L.Trainer) -> int | None:
    """Optimizer steps of the whole run (``max_steps``, or what the epochs amount to)."""
    total = trainer.estimated_stepping_batches
    return int(total) if total != float("inf") else None


class _StepMeter:
    """Train loss and label tokens per optimizer step, collected without a host sync per step.

    Lightning updates ``callback_metrics`` only after ``on_train_batch_end``, so a finished
    step's logged loss is read when the next batch starts (or validation or the end comes).
    Label tokens add up on the device; :meth:`interval` reads them back (summed over ranks),
    so every rank must call it at the same steps.
    """

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.loss_count = 0
        self.tokens: torch.Tensor | None = None
        self.total_tokens = 0
        self.pending = False
        self.start = self.mark = time.perf_counter()
        self.start_step = self.mark_step = 0

    def begin(self, trainer: L.Trainer) -> None:
        self.__init__()
        self.start_step = self.mark_step = trainer.global_step

    def batch_end(self, batch: Any) -> None:
        if isinstance(batch, dict) and "labels" in batch:
            count = label_token_count(batch["labels"])
            self.tokens = count if self.tokens is None else self.tokens + count
        self.pending = True

    def collect(self, trainer: L.Trainer) -> None:
        """Add the last finished batch's logged train loss (once)."""
        if not self.pending:
            return
        self.pending = False
        loss = trainer.callback_metrics.get(TRAIN_LOSS)
        if loss is not None:
            loss = loss.detach()
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
            self.loss_count += 1

    def interval(self, trainer: L.Trainer) -> dict[str, float]:
        """Mean train loss, tokens and seconds since the last call (or the start), then reset."""
        tokens = self.tokens if self.tokens is not None else torch.zeros((), dtype=torch.long)
        tokens = int(
            trainer.strategy.reduce(tokens.to(trainer.strategy.root_device), reduce_op="sum").item()
        )
        now = time.perf_counter()
        mean = (self.loss_sum / self.loss_count).item() if self.loss_count else float("nan")
        out = {
            "loss": mean,
            "tokens": tokens,
            "seconds": now - self.mark,
            "steps": trainer.global_step - self.mark_step,
        }
        self.total_tokens += tokens
        self.loss_sum, self.loss_count, self.tokens = None, 0, None
        self.mark, self.mark_step = now, trainer.global_step
        return out


class RunProgress(TQDMProgressBar):
    """The default progress display of ``lit-cats fit``.

    On a terminal, a bar over the whole run: optimizer step N of M (``max_steps`` or what the
    epochs amount to), elapsed time and ETA, the logged metrics without ``v_num``. When stdout is
    not a terminal (a log file, a cluster job), no bar but a plain line every
    ``log_every_n_steps`` steps: step/total, the train loss averaged over those steps (as the
    Hugging Face Trainer logs it), learning rate, gradient norm, tokens/s and ETA::

        step 10/60 (17%)  loss 10.4075  lr 3.00e-03  grad_norm 1.61  tokens/s 1,874 ...
        ... elapsed 0:00:05  eta 0:00:25

    Off with ``--trainer.enable_progress_bar false``.

    Args:
        refresh_rate: Steps between bar updates.
        plain: Plain lines instead of a bar; ``None``: when stdout is not a terminal.
    """

    def __init__(self, refresh_rate: int = 1, plain: bool | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.plain = plain
        self.meter = _StepMeter()  # plain lines only; RunSummary reads it instead of its own
        self.last_interval: dict[str, float] = {}
        self._printed_step = -1

    @property
    def is_plain(self) -> bool:
        return not sys.stdout.isatty() if self.plain is None else self.plain

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.is_plain:
            self.disable()  # no bars; the plain lines below instead

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    # ------------------------------------------------------------------ the whole-run bar
    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.unit = "step"
        return bar

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.meter.begin(trainer)
        self._printed_step = trainer.global_step
        bar = self.train_progress_bar
        bar.reset(total=_total_steps(trainer))
        bar.initial = bar.n = trainer.global_step  # a resumed run: ETA from this run's pace
        bar.set_description("Training")

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run, not one per epoch

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._plain_line(trainer)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.is_plain:  # a bar needs no token counts
            self.meter.batch_end(batch)
        step, bar = trainer.global_step, self.train_progress_bar
        if not self.is_plain and self._should_update(step, bar.total or 0) and bar.n != step:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._plain_line(trainer)
        super().on_validation_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._plain_line(trainer)  # before the end's samples and saving: a true tokens/s
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._plain_line(trainer, last=True)
        super().on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ plain lines
    def _plain_line(self, trainer: L.Trainer, last: bool = False) -> None:
        if not self.is_plain or trainer.state.fn != "fit":
            return
        self.meter.collect(trainer)
        step = trainer.global_step
        due = step % trainer.log_every_n_steps == 0 or (last and step > self.meter.mark_step)
        if step == self._printed_step or not due:
            return
        self._printed_step = step
        interval = self.meter.interval(trainer)  # every rank: tokens are summed over ranks
        self.last_interval = interval
        if trainer.is_global_zero:
            print(self.plain_line(trainer, interval), flush=True)

    def plain_line(self, trainer: L.Trainer, interval: dict[str, float]) -> str:
        step, total = trainer.global_step, _total_steps(trainer)
        elapsed = time.perf_counter() - self.meter.start
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        parts.append(f"loss {interval['loss']:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        grad_norm = trainer.callback_metrics.get(GRAD_NORM)
        if grad_norm is not None:
            parts.append(f"grad_norm {float(grad_norm):.3g}")
        parts.append(f"tokens/s {interval['tokens'] / max(interval['seconds'], 1e-9):,.0f}")
        parts.append(f"elapsed {_duration(elapsed)}")
        done = step - self.meter.start_step
        if total and done > 0:
            parts.append(f"eta {_duration(elapsed / done * (total - step))}")
        return "  ".join(parts)


class RunSummary(L.Callback):
    """At the end of ``fit`` (rank zero): losses, time, tokens, where everything is, what next.

    Example of what it prints::

        lit-cats fit done: 60 steps in 0:00:36, 29,959 tokens trained
          train loss 6.1306 (mean of the last 5 steps), validation loss 6.1772
          adapter:      logs/tiny-cats/version_0/adapter
          checkpoints:  logs/tiny-cats/version_0/checkpoints
          TensorBoard:  logs/tiny-cats/version_0
        Next:
          lit-cats predict --config logs/tiny-cats/version_0/config.yaml --config
            configs/predict.yaml --model.adapter logs/tiny-cats/version_0/adapter   (one line)
          lit-cats merge --adapter logs/tiny-cats/version_0/adapter
          tensorboard --logdir logs/tiny-cats

    Args:
        configs: The ``--config`` files of this run, in order. The ``predict`` command uses
            the run folder's ``config.yaml`` (these files when it was not saved) and
            ``predict.yaml`` from the folder of the first.
    """

    def __init__(self, configs: Sequence[str | Path] = ()) -> None:
        self.configs = [str(c) for c in configs]
        self._meter = _StepMeter()
        self._last: dict[str, float] = {}
        self._lines: RunProgress | None = None  # plain progress lines whose meter is shared
        self.text = ""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Plain progress lines measure the same intervals: count tokens (and sync) once.
        self._lines = next(
            (cb for cb in trainer.callbacks if isinstance(cb, RunProgress) and cb.is_plain), None
        )
        self._meter.begin(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._interval(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if self._lines is None:
            self._meter.batch_end(batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._interval(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._interval(trainer, last=True)

    def _interval(self, trainer: L.Trainer, last: bool = False) -> None:
        if self._lines is not None:
            return
        self._meter.collect(trainer)
        step = trainer.global_step
        if step > self._meter.mark_step and (step % trainer.log_every_n_steps == 0 or last):
            self._last = self._meter.interval(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After every on_train_end: the adapter is saved and the last samples are logged.
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast: every rank
        if trainer.is_global_zero:
            self.text = self.summary(trainer, run_dir)
            print(self.text, flush=True)

    def summary(self, trainer: L.Trainer, run_dir: Path) -> str:
        if self._lines is not None:
            meter, last = self._lines.meter, self._lines.last_interval
        else:
            meter, last = self._meter, self._last
        steps = trainer.global_step - meter.start_step
        elapsed = time.perf_counter() - meter.start
        lines = [
            f"lit-cats fit done: {steps} steps in {_duration(elapsed)}, "
            f"{meter.total_tokens:,} tokens trained"
        ]
        losses = []
        if last.get("steps"):
            losses.append(f"train loss {last['loss']:.4f} (mean of the last {last['steps']} steps)")
        val = trainer.callback_metrics.get(VAL_LOSS)
        if val is not None:
            losses.append(f"validation loss {float(val):.4f}")
        if losses:
            lines.append("  " + ", ".join(losses))
        adapter = run_dir / ADAPTER_DIRNAME
        lines.append(f"  adapter:      {adapter}")
        checkpoints = [cb.dirpath for cb in trainer.checkpoint_callbacks if cb.dirpath]
        if checkpoints:
            lines.append(f"  checkpoints:  {checkpoints[0]}")
        tensorboard = next(
            (lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None
        )
        if tensorboard is not None:
            lines.append(f"  TensorBoard:  {tensorboard.log_dir}")
        lines.append("Next:")
        lines.append("  " + " ".join(self.predict_command(run_dir, adapter)))
        lines.append(f"  lit-cats merge --adapter {adapter}")
        if tensorboard is not None:
            lines.append(f"  tensorboard --logdir {tensorboard.root_dir}")
        return "\n".join(lines)

    def predict_command(self, run_dir: Path, adapter: Path) -> list[str]:
        """``lit-cats predict`` on this run's resolved ``config.yaml`` (every override included;
        else the run's ``--config`` files), then ``predict.yaml``, with the run's adapter."""
        args = ["lit-cats", "predict"]
        saved = run_dir / "config.yaml"
        for config in [str(saved)] if saved.is_file() else self.configs:
            args += ["--config", config]
        if self.configs:
            predict_yaml = Path(self.configs[0]).parent / "predict.yaml"
            if predict_yaml.is_file() and str(predict_yaml) not in self.configs:
                args += ["--config", str(predict_yaml)]
        return [*args, "--model.adapter", str(adapter)]
