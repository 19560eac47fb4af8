"""Progress a person can follow: the whole-run bar, plain lines in logs, the end summary, and
TensorBoard tags grouped by prefix with a loss chart (``lit_cats.callbacks.progress``)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shlex
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lit_cats.cli import main

RUN = Path("logs", "tiny-cats", "version_0")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCRIPT = Path(sys.executable).with_name("lit-cats")
LINE = re.compile(
    r"^step (\d+)/(\d+) \(\d+%\)  loss (\d+\.\d{4})  lr \d\.\d\de-\d\d  grad_norm \S+  "
    r"tokens/s [\d,]+  elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d$",
    re.MULTILINE,
)
#: Both runs: 6 steps, validation (and samples) after steps 3 and 6, the plain lines on.
SIX_STEPS = ("--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
             "--trainer.enable_progress_bar", "true")  # fmt: skip


def _events(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def every_step(tmp_path_factory, fit_args) -> tuple[Path, str]:
    """In-process fit, a line every step (stdout is pytest's capture: not a terminal)."""
    cwd = tmp_path_factory.mktemp("every-step")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        out = cwd / "stdout.txt"
        with out.open("w") as stream:
            patch.setattr(sys, "stdout", stream)
            main(fit_args(*SIX_STEPS, "--trainer.log_every_n_steps", "1"))
    return cwd, out.read_text()


@pytest.fixture(scope="module")
def every_third(tmp_path_factory, fit_args) -> tuple[Path, str]:
    """The console script writing to a pipe (as to a log file), a line every 3 steps."""
    cwd = tmp_path_factory.mktemp("every-third")
    args = fit_args(*SIX_STEPS, "--trainer.log_every_n_steps", "3")
    proc = subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc.stdout


def test_plain_lines_every_log_every_n_steps_when_stdout_is_not_a_terminal(every_third):
    _, out = every_third
    assert [(int(s), int(t)) for s, t, _ in LINE.findall(out)] == [(3, 6), (6, 6)]
    assert "it/s" not in out and "step/s" not in out and "v_num" not in out  # no bar


def test_plain_lines_show_the_mean_train_loss_of_their_interval(every_step, every_third):
    per_step = [e.value for e in _events(every_step[0] / RUN).Scalars("loss/train")]
    lines = [float(loss) for *_, loss in LINE.findall(every_step[1])]
    assert len(per_step) == 6 and lines == pytest.approx(per_step, abs=1e-4)
    means = [float(loss) for *_, loss in LINE.findall(every_third[1])]
    expected = [sum(per_step[:3]) / 3, sum(per_step[3:]) / 3]
    assert means == pytest.approx(expected, abs=2e-4)  # the interval's mean, not its last step
    assert means != pytest.approx([per_step[2], per_step[5]], abs=2e-4)


def test_end_summary_names_losses_time_tokens_and_where_everything_is(every_third):
    cwd, out = every_third
    summary = out[out.index("lit-cats fit done:") :]
    val = _events(cwd / RUN).Scalars("loss/val")[-1].value
    assert re.search(r"lit-cats fit done: 6 steps in \d+:\d\d:\d\d, [\d,]+ tokens trained", summary)
    assert re.search(r"train loss \d+\.\d{4} \(mean of the last 3 steps\)", summary)
    assert f"validation loss {val:.4f}" in summary
    assert f"adapter:      {RUN / 'adapter'}\n" in summary
    assert f"checkpoints:  {RUN / 'checkpoints'}\n" in summary
    assert f"TensorBoard:  {RUN}\n" in summary
    assert f"lit-cats merge --adapter {RUN / 'adapter'}\n" in summary
    assert "tensorboard --logdir logs/tiny-cats" in summary
    tokens = int(re.search(r"([\d,]+) tokens trained", summary)[1].replace(",", ""))
    assert tokens > 0


def _shape(line: str) -> str:
    return re.sub(r"[\d,.:]+", "N", line.replace(str(CONFIGS), "configs"))


def test_the_readme_shows_the_lines_and_summary_as_printed(every_third):
    readme = (CONFIGS.parent / "README.md").read_text()
    block = readme[readme.index("```text\nstep ") + len("```text\n") :]
    block = block[: block.index("```")].splitlines()
    printed = every_third[1].splitlines()
    printed = printed[next(i for i, line in enumerate(printed) if LINE.match(line)) :]
    assert [_shape(line) for line in block if line != "..."] == [
        _shape(line) for line in printed[:2] + printed[-10:]
    ]


def test_the_printed_predict_command_runs(every_third, monkeypatch):
    cwd, out = every_third
    command = next(line for line in out.splitlines() if "lit-cats predict" in line)
    args = shlex.split(command)
    assert args[:2] == ["lit-cats", "predict"]
    assert f"{RUN}/config.yaml" in args and str(RUN / "adapter") in args  # this run's settings
    monkeypatch.chdir(cwd)
    quick = ["--data.prompts", '["Why the box?"]', "--model.generation.max_new_tokens", "4"]
    main([*args[1:], *quick, "--trainer.enable_progress_bar", "false"])
    records = (cwd / "logs" / "tiny-cats" / "version_1" / "predictions.jsonl").read_text()
    assert [json.loads(r)["prompt"] for r in records.splitlines()] == ["Why the box?"]


def test_tensorboard_tags_are_grouped_with_a_loss_chart_and_no_epoch(every_third):
    events = _events(every_third[0] / RUN)
    scalars = set(events.Tags()["scalars"])
    expected = {"loss/train", "loss/val", "loss/val_ppl", "optim/lr", "optim/grad_norm",
                "speed/tokens_per_s", "samples/stopped_share"}  # fmt: skip
    assert expected <= scalars
    assert "epoch" not in scalars and all("/" in tag for tag in scalars)
    assert {f"samples/{i}/text_summary" for i in range(4)} <= set(events.Tags()["tensors"])
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["train and validation"] == ["loss/train", "loss/val"]


def test_on_a_terminal_one_bar_counts_the_whole_run_without_v_num(run_dir, fit_args):
    args = fit_args("--trainer.max_steps", "4", "--trainer.enable_progress_bar", "true",
                    "--samples.enabled", "false")  # fmt: skip
    master, slave = pty.openpty()
    # A terminal of 120 columns (a fresh pseudo-terminal has 0, and tqdm draws nothing in 0).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen([str(SCRIPT), *args], stdout=slave, stderr=subprocess.DEVNULL)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal closed with the process
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    assert proc.wait(timeout=300) == 0
    reader.join(timeout=10)
    os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert re.search(r"Training: .*4/4 \[\d\d:\d\d<00:00", out)  # the run's steps, elapsed<ETA
    assert "v_num" not in out and "Epoch 0" not in out
    assert not LINE.search(out.replace("\r", "\n"))  # a bar, not plain lines
    assert "lit-cats fit done: 4 steps" in out


def test_progress_bar_off_keeps_the_summary_without_lines(run_dir, fit_args, capsys):
    main(fit_args("--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1",
                  "--samples.enabled", "false"))  # fmt: skip
    out = capsys.readouterr().out
    assert not LINE.search(out)
    assert "lit-cats fit done: 2 steps" in out
