"""The seed's job end to end: wall clock from the command to the saved adapter, and where it goes.

A seed-sized job (issue 24): 1,000 rows of 50-250 tokens, 3 epochs, on the random-weight
Phi-3-mini of ``bench_train.py`` saved locally. Each arm is a fresh process, timed from its
start to its exit, with its phases recorded from inside (:class:`PhaseTimer`):

* ``auto``: ``lit-cats fit --config qlora.yaml --config fast.yaml --model.speed.compile auto``,
  the real command (validation and samples included, Hub push off: no network);
* ``compile_cold``: the same with ``compile: true`` and an empty Inductor cache;
* ``compile_warm``: the same again, in a new process with the cache the cold arm filled (a new
  ``version_N``): how much of the compilation torch's caches save;
* ``trl``: the original script's recipe (TRL ``SFTTrainer``, batch 2, paged AdamW 32-bit,
  checkpointing, a checkpoint every 50 steps) on the same rows. It takes ~1,500 steps, far past
  one GPU call: it trains ``--trl-steps`` steps and the rest of its training is extrapolated
  from its measured steady step time (said in the table).

    python benchmarks/bench_seed_job.py --out seed_job.md      # GPU: every arm, ~7 min
    python benchmarks/bench_seed_job.py --arms auto,trl
    python benchmarks/bench_seed_job.py --tiny                 # CPU smoke: tiny model, seconds
    python benchmarks/bench_seed_job.py --plain-env --arms auto  # only lit-cats' dependencies

Targets: <= 60 s with a warm cache, <= 90 s cold, and >= 10x faster than the original.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import bench_train  # noqa: E402  (the harness next to this file)

ARMS = ("auto", "compile_cold", "compile_warm", "trl")


# ------------------------------------------------------------------------------- in the fit
class PhaseTimer(L.Callback):
    """Wall-clock marks of a ``lit-cats fit`` (added with ``--trainer.callbacks+=``), written as
    JSON at teardown. Steps are timed between device synchronisations, so each step's seconds
    are its own; a step far slower than the median is counted as compilation (the first steps
    compile the layers, and a new shape compiles once more).

    Args:
        path: JSON file to write.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.marks: dict[str, float] = {"cli": time.time()}  # built by the CLI, before the plan
        self.steps: list[float] = []
        self.tokens: list[int] = []  # per step (packed: the row; padded: rows x width)
        self.validation = 0.0
        self._t = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.marks.setdefault("data_ready", time.time())  # after the data module's setup

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks["model_ready"] = time.time()  # after configure_model: the base is loaded

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._sync()
        self._t = time.time()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, out: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        self._sync()
        self.steps.append(time.time() - self._t)
        self.tokens.append(int(batch["input_ids"].numel()))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync()
        self._v = time.time()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync()
        self.validation += time.time() - self._v

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.marks["train_end"] = time.time()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.marks["teardown"] = time.time()
        compiled = bool(getattr(getattr(pl_module, "kit", None), "settings", None).compile)
        Path(self.path).write_text(json.dumps(self.report(compiled)))

    def report(self, compiled: bool) -> dict[str, Any]:
        m = self.marks
        median = statistics.median(self.steps) if self.steps else 0.0
        slow = [s - median for s in self.steps if s > 3 * median]  # compilation, mostly
        steps = sum(self.steps)
        return {
            "compiled": compiled,
            "steps": len(self.steps),
            "median_step_s": median,
            # steady pace: steps not counted as compilation (the calibration table's figure)
            "steady_tokens_per_s": _steady_rate(self.steps, self.tokens, median),
            "marks": m,
            "plan_and_tokenize_s": m["data_ready"] - m["cli"],
            "load_s": m["model_ready"] - m["data_ready"],
            "compile_s": sum(slow) if compiled else 0.0,
            "first_steps_excess_s": sum(slow),
            "train_s": steps - (sum(slow) if compiled else 0.0),
            "validate_s": self.validation,
            "loop_other_s": m["train_end"] - m["model_ready"] - steps - self.validation,
            "end_s": m["teardown"] - m["train_end"],  # final samples, adapter save
            "dynamo": _dynamo_times(),
        }


def _steady_rate(steps: list[float], tokens: list[int], median: float) -> float:
    """Tokens per second over the steps that did not compile (at most 3x the median)."""
    kept = [(d, t) for d, t in zip(steps, tokens, strict=True) if d <= 3 * median]
    seconds = sum(d for d, _ in kept)
    return sum(t for _, t in kept) / seconds if seconds else 0.0


def _dynamo_times() -> dict[str, float]:
    """torch's own compile-time account, where this torch has it (seconds per phase)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return {k: round(v, 2) for k, v in calculate_time_spent().items()}
    except Exception:  # a private helper: absent or changed in some versions
        return {}


# ------------------------------------------------------------------------------- the rows
def make_rows(tokenizer: Any, count: int, low: int, high: int, seed: int = 0) -> list[str]:
    """``count`` texts of ``low``-``high`` tokens (seeded): random ordinary tokens, decoded."""
    gen = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special and i >= 256]
    rows = []
    for n in torch.randint(low, high + 1, (count,), generator=gen).tolist():
        picks = torch.randint(0, len(vocab), (n,), generator=gen).tolist()
        text = tokenizer.decode([vocab[i] for i in picks])
        # Decoding joins some tokens that re-encode as one, or splits others: cut to the range.
        rows.append(tokenizer.decode(tokenizer(text).input_ids[:high]))
    return rows


def write_rows(model_dir: Path, folder: Path, count: int, low: int, high: int) -> dict[str, Any]:
    """The job's dataset as ``rows.jsonl`` (a ``text`` column, the seed dataset's shape)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = make_rows(tokenizer, count, low, high)
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    lengths = [len(tokenizer(r).input_ids) for r in rows]
    return {"path": str(path), "rows": count, "tokens": sum(lengths),
            "min": min(lengths), "max": max(lengths)}  # fmt: skip


# ------------------------------------------------------------------- a plain install's packages
def dependency_closure(requirements: list[str]) -> set[str]:
    """Normalized names of the installed distributions that ``requirements`` pull in, with
    their own requirements (markers and extras evaluated): what ``pip install`` of a package
    with these dependencies installs, among what this interpreter has."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, ...]] = set()  # (name, *extras)
    todo = [(Requirement(r), ("",)) for r in requirements]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (an optional or lazily imported dependency)
        key = (name, *sorted(req.extras))
        if key in seen:
            continue
        seen.add(key)
        own = ("", *sorted(req.extras))
        todo += [(Requirement(r), own) for r in dist.requires or []]
    return {key[0] for key in seen}


def plain_environment(folder: Path) -> tuple[Path, list[str]]:
    """A virtual environment that sees only lit-cats' dependency closure among this
    interpreter's packages (symlinks into its site-packages): the packages ``pip install
    lit-cats`` would give, without what else this machine's image holds (on the GPU image:
    torchvision, scipy, matplotlib, which torchmetrics imports at start when it finds them).
    Returns its interpreter and the entries it hides. Packages on ``PYTHONPATH`` (the wheels
    carried to the GPU host) stay visible, as the arms pass it on."""
    import site
    from importlib import metadata

    import tomllib
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    keep = dependency_closure(project["dependencies"])
    # Every site directory this interpreter reads (a venv's, and its base's where the venv sees
    # them), not the PYTHONPATH folders, which the arms keep.
    extra = {Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    found = [*site.getsitepackages(), *(p for p in sys.path if p.endswith("-packages"))]
    sites = list(dict.fromkeys(Path(p).resolve() for p in found if Path(p).is_dir()))
    sites = [d for d in sites if d not in extra]
    owned: dict[Path, dict[str, bool]] = {d: {} for d in sites}  # entry -> kept by some dist
    for dist in metadata.distributions():
        root = Path(dist.locate_file("")).resolve()
        if root not in owned or not dist.files:
            continue
        kept = canonicalize_name(dist.metadata["Name"]) in keep
        for entry in {f.parts[0] for f in dist.files if f.parts and f.parts[0] != ".."}:
            owned[root][entry] = owned[root].get(entry, False) or kept
    venv = folder / "plain-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    target = next((venv / "lib").glob("python*/site-packages"))
    hidden: list[str] = []
    for root in sites:
        for entry in sorted(root.iterdir()):
            if entry.name in owned[root] and not owned[root][entry.name]:
                hidden.append(entry.name)
            elif not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    return venv / "bin" / "python", sorted(set(hidden))


# ------------------------------------------------------------------------------- the arms
def lit_cats_arm(
    arm: str,
    model_dir: Path,
    rows: Path,
    work: Path,
    cache: Path,
    epochs: int,
    tiny: bool,
    python: str = sys.executable,
) -> dict[str, Any]:
    """One ``lit-cats fit`` in a fresh process: its wall clock and phases."""
    report = work / f"{arm}.json"
    timer = {"class_path": "bench_seed_job.PhaseTimer", "init_args": {"path": str(report)}}
    compile_value = "auto" if arm == "auto" else "true"
    cmd = [
        python, "-m", "lit_cats.cli", "fit",
        "--config", str(REPO / "configs" / "qlora.yaml"),
        "--config", str(REPO / "configs" / "fast.yaml"),
        "--model.model_name_or_path", str(model_dir),
        "--data.dataset", str(rows),
        "--model.speed.compile", compile_value,
        "--trainer.max_epochs", str(epochs),
        "--trainer.callbacks+=" + json.dumps(timer),
        "--hub.enabled", "false",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    if tiny:
        cmd += ["--trainer.accelerator", "cpu", "--data.max_tokens_per_batch", "2048"]
    path = os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": path}  # fmt: skip
    return _timed(arm, cmd, env, work, report)


def trl_arm(model_dir: Path, rows: Path, work: Path, epochs: int, steps: int) -> dict[str, Any]:
    """The original recipe in a fresh process (``--trl-worker``)."""
    report = work / "trl.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(model_dir),
           str(rows), str(report), str(epochs), str(steps)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return _timed("trl", cmd, env, work, report)


def _timed(arm: str, cmd: list[str], env: dict, work: Path, report: Path) -> dict[str, Any]:
    start = time.time()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    end = time.time()
    (work / f"{arm}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not report.exists():
        tail = (proc.stdout + proc.stderr)[-600:]
        return {"arm": arm, "error": f"exit {proc.returncode}: {tail}"}
    phases = json.loads(report.read_text())
    phases["start_s"] = phases["marks"]["cli"] - start  # interpreter, imports, parsing
    phases["exit_s"] = end - phases["marks"]["teardown"]
    return {"arm": arm, "wall_s": end - start, **phases}


def trl_worker(model_dir: str, rows: str, report: str, epochs: int, steps: int) -> None:
    """The original script's training (its TrainingArguments), timed by phase."""
    marks = {"cli": time.time()}
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(REPO))
    from lit_cats.recipe import build_bnb_config

    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=build_bnb_config("nf4", True, "bfloat16"),
        dtype=torch.bfloat16,
        device_map={"": 0 if on_gpu else "cpu"},
    )
    marks["model_ready"] = time.time()
    data = datasets.load_dataset("json", data_files=rows, split="train")
    full_steps = math.ceil(len(data) / 2) * epochs
    step_times: list[float] = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t = time.time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            step_times.append(time.time() - self.t)

    # No warm-up argument: transformers 5 dropped warmup_ratio, and the original's constant
    # schedule ignored its warmup_ratio 0.03 anyway (README: how lit-cats differs).
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=2,
            gradient_accumulation_steps=1, optim="paged_adamw_32bit", learning_rate=2e-4,
            weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.3,
            bf16=True, gradient_checkpointing=True, max_length=512, logging_steps=10,
            gradient_checkpointing_kwargs={"use_reentrant": False},  # as bench_train's trl_b2
            save_steps=50, report_to="none", disable_tqdm=True, use_cpu=not on_gpu,
            max_steps=min(steps, full_steps), dataset_text_field="text", seed=42,
        )  # fmt: skip
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
                          target_modules=bench_train.TARGETS, task_type="CAUSAL_LM")  # fmt: skip
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=lora,
                             processing_class=tokenizer, callbacks=[Steps()])  # fmt: skip
        marks["data_ready"] = time.time()  # SFTTrainer tokenizes in __init__
        trainer.train()
        marks["train_end"] = time.time()
        trainer.save_model(str(Path(out) / "adapter"))
        marks["teardown"] = time.time()
    ran = len(step_times)
    steady = statistics.median(step_times[len(step_times) // 4 :]) if step_times else 0.0
    measured_train = marks["train_end"] - marks["data_ready"]
    Path(report).write_text(json.dumps({
        "compiled": False, "steps": ran, "full_steps": full_steps, "median_step_s": steady,
        "marks": marks, "plan_and_tokenize_s": marks["data_ready"] - marks["model_ready"],
        "load_s": marks["model_ready"] - marks["cli"], "compile_s": 0.0,
        "train_s": measured_train, "validate_s": 0.0, "loop_other_s": 0.0,
        "end_s": marks["teardown"] - marks["train_end"],
        "extrapolated_train_s": measured_train + (full_steps - ran) * steady,
    }))  # fmt: skip


# ------------------------------------------------------------------------------- the report
def table(rows: list[dict[str, Any]], job: dict[str, Any]) -> str:
    lines = [
        f"Job: {job['rows']:,} rows of {job['min']}-{job['max']} tokens ({job['tokens']:,} "
        f"tokens), {job['epochs']} epochs.",
        "",
        "| arm | wall s (command to adapter) | start-up | plan + tokenize | load | compile | "
        "train | validate + samples | loop other | end (samples, save) | exit | steps | compiled "
        "| steady tok/s | x original |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    trl = next((r for r in rows if r["arm"] == "trl" and "error" not in r), None)
    trl_wall = _whole_wall(trl) if trl else None
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arm']} | failed: {r['error'][-200:]!r} ||||||||||||||")
            continue
        wall = _whole_wall(r)
        shown = f"{wall:.1f}" + (" (extrapolated)" if "extrapolated_train_s" in r else "")
        ratio = f"{trl_wall / wall:.1f}x" if trl_wall and r is not trl else "-"
        train = r["train_s"]
        rate = f"{r['steady_tokens_per_s']:,.0f}" if "steady_tokens_per_s" in r else "-"
        if "extrapolated_train_s" in r:
            train_cell = (f"{train:.1f} ({r['steps']} of {r['full_steps']} steps), "
                          f"{r['extrapolated_train_s']:.0f} for all")  # fmt: skip
        else:
            train_cell = f"{train:.1f}"
        lines.append(
            f"| {r['arm']} | {shown} | {r['start_s']:.1f} | {r['plan_and_tokenize_s']:.1f} | "
            f"{r['load_s']:.1f} | {r['compile_s']:.1f} | {train_cell} | {r['validate_s']:.1f} | "
            f"{r['loop_other_s']:.1f} | {r['end_s']:.1f} | {r['exit_s']:.1f} | {r['steps']} | "
            f"{'yes' if r['compiled'] else 'no'} | {rate} | {ratio} |"
        )
    return "\n".join(lines)


def _whole_wall(r: dict[str, Any]) -> float:
    """The arm's wall clock; the original's with its unrun steps added at its steady pace."""
    if "extrapolated_train_s" in r:
        return r["wall_s"] - r["train_s"] + r["extrapolated_train_s"]
    return r["wall_s"]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated: " + ",".join(ARMS))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 60 rows")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trl-steps", type=int, default=150, help="steps the original trains")
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "phi3-random"
    )
    parser.add_argument("--work", type=Path, help="folder for runs and logs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("bench_seed_job.md"), help="table file")
    parser.add_argument("--results", type=Path, help="also append the table to this RESULTS.md")
    parser.add_argument("--commit", help="commit to record (where the tree has no .git)")
    parser.add_argument(
        "--plain-env",
        action="store_true",
        help="run the lit-cats arms in a venv holding only lit-cats' dependency closure "
        "(as `pip install lit-cats`), not every package of this machine's image",
    )
    parser.add_argument("--trl-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        model_dir, rows, report, epochs, steps = args.trl_worker
        trl_worker(model_dir, rows, report, int(epochs), int(steps))
        return []
    device = "cpu" if args.tiny else "cuda"
    count, epochs = (60, 1) if args.tiny else (args.rows, args.epochs)
    work = args.work or Path(tempfile.mkdtemp(prefix="seed-job-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = bench_train.build_random_phi3(args.model_dir, device, args.tiny)
    job = {**write_rows(model_dir, work, count, 50, 250), "epochs": epochs}
    cache = work / "inductor-cache"  # empty: the first compiling arm is cold
    python, hidden = sys.executable, []
    if args.plain_env:
        venv_python, hidden = plain_environment(work)
        python = str(venv_python)
    results = []
    for arm in args.arms.split(","):
        if arm == "trl":
            steps = 4 if args.tiny else args.trl_steps
            row = trl_arm(model_dir, Path(job["path"]), work, epochs, steps)
        else:
            row = lit_cats_arm(
                arm, model_dir, Path(job["path"]), work, cache, epochs, args.tiny, python
            )
            if args.plain_env:
                row["arm"] += " (plain install)"
        results.append(row)
        print(json.dumps(row), flush=True)
    body = table(results, job)
    if args.plain_env:
        body += (
            "\n\n(plain install): lit-cats' dependency closure only; not visible to those arms: "
            + ", ".join(hidden)
        )
    print(body)
    args.out.write_text(body + "\n")
    if args.results:
        env = bench_train.environment(device)
        if args.commit:
            env["commit"] = args.commit
        model = "tiny model (CPU smoke)" if args.tiny else "random-weight Phi-3-mini"
        bench_train.append_results(args.results, env, body, model, section="bench_seed_job")
    return results


if __name__ == "__main__":
    main()
