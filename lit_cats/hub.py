"""Push a run folder (adapter, tokenizer, config, model card) to the Hugging Face Hub.

Lightning-free helpers shared by :class:`lit_cats.callbacks.HubPushCallback` and the
``lit-cats push`` command. A push is one commit built from an :data:`UploadPlan` (path in the
repo -> local file), sent with ``HfApi.create_commit`` so each push is atomic on the Hub.

The token comes from ``HF_TOKEN`` or ``hf auth login``: ``huggingface_hub`` reads it per request
and nothing here ever holds, logs or writes it. ``HF_ENDPOINT`` selects another Hub.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

from lit_cats.inference import ADAPTER_CONFIG, ADAPTER_DIRNAME

log = logging.getLogger(__name__)

UploadPlan = dict[str, Path]
"""What one commit uploads: path in the repo -> local file."""

CONFIG_FILENAME = "config.yaml"
CARD_FILENAME = "README.md"
CHECKPOINT_FOLDER = "last-checkpoint"
CHECKPOINT_FILENAME = "last.ckpt"
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_TRAINER_KEYS = (
    "max_epochs",
    "max_steps",
    "accumulate_grad_batches",
    "precision",
    "gradient_clip_val",
)
T = TypeVar("T")


# ------------------------------------------------------------------------------ upload plans
def folder_plan(folder: Path, prefix: str = "") -> UploadPlan:
    """Plan every file under ``folder``, placed under ``prefix`` in the repo."""
    return {
        prefix + p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_plan(run_dir: Path, adapter_dir: Path) -> UploadPlan:
    """Plan the adapter + tokenizer at the repo root and the run's resolved ``config.yaml``."""
    plan = folder_plan(adapter_dir)
    if (run_dir / CONFIG_FILENAME).is_file():
        plan[CONFIG_FILENAME] = run_dir / CONFIG_FILENAME
    return plan


def checkpoint_plan(adapter_dir: Path, checkpoint: Path, config: Path | None) -> UploadPlan:
    """Plan the resumable ``last-checkpoint/`` folder: adapter, Lightning checkpoint, config."""
    prefix = f"{CHECKPOINT_FOLDER}/"
    plan = folder_plan(adapter_dir, prefix)
    plan[prefix + CHECKPOINT_FILENAME] = checkpoint
    if config is not None and config.is_file():
        plan[prefix + CONFIG_FILENAME] = config
    return plan


def write_plan(plan: Mapping[str, Path], dest: Path) -> None:
    """Copy a plan into ``dest`` laid out as in the repo (the dry-run "upload")."""
    for path_in_repo, local in plan.items():
        target = dest / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)


def run_name(run_dir: Path) -> str:
    """Repo name for a run folder: the experiment name for ``<name>/version_N``, else the folder."""
    name = run_dir.parent.name if re.fullmatch(r"version_\d+", run_dir.name) else run_dir.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "lit-cats-adapter"


def push_command(run_dir: Path, repo_id: str, revision: str | None = None) -> str:
    """The shell command that pushes ``run_dir`` later (printed when a push fails)."""
    command = f"lit-cats push {run_dir} --repo_id {repo_id}"
    return command + (f" --revision {revision}" if revision else "")


# ------------------------------------------------------------------------------ model card
@dataclass(frozen=True)
class RunSummary:
    """What the model card says about a run."""

    base_model: str | None = None
    dataset: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    step: int | None = None
    resumable: bool = False
    extra_tags: tuple[str, ...] = ()


def summarize_run(
    run_dir: Path,
    adapter_dir: Path,
    metrics: Mapping[str, float],
    step: int | None,
    resumable: bool = False,
) -> RunSummary:
    """Read the base model, dataset and hyperparameters from the run's config and adapter."""
    config = _read_yaml(run_dir / CONFIG_FILENAME)
    model, data = _init_args(config.get("model")), _init_args(config.get("data"))
    adapter_config = _read_json(adapter_dir / ADAPTER_CONFIG)
    trainer = config.get("trainer") or {}
    hyperparameters = {k: config[k] for k in ("seed_everything", "model", "data") if k in config}
    hyperparameters["trainer"] = {
        k: trainer[k] for k in _TRAINER_KEYS if trainer.get(k) is not None
    }
    return RunSummary(
        base_model=model.get("model_name_or_path") or adapter_config.get("base_model_name_or_path"),
        dataset=data.get("dataset"),
        hyperparameters={k: v for k, v in hyperparameters.items() if v},
        metrics=dict(metrics),
        step=step,
        resumable=resumable,
        extra_tags=("qlora",) if model.get("load_in_4bit") else (),
    )


def render_model_card(repo_id: str, summary: RunSummary) -> str:
    """README.md for the repo: YAML metadata, hyperparameters, metrics, how to use it."""
    base, dataset = summary.base_model, summary.dataset
    tags = ["lit-cats", "lightning", "peft", "lora", *summary.extra_tags]
    if base:
        tags.append(f"base_model:adapter:{base}")  # the Hub's adapter-of-base link
    metadata = ModelCardData(
        base_model=base,
        datasets=[dataset] if dataset and _is_hub_id(dataset) else None,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=tags,
    )
    sections = [
        f"---\n{metadata.to_yaml()}\n---\n",
        f"# {repo_id.split('/')[-1]}\n",
        f"A LoRA adapter for `{base or 'an unknown base model'}`, fine-tuned on "
        f"`{dataset or 'an unknown dataset'}` with lit-cats (Lightning, peft, bitsandbytes).\n",
        _metrics_section(summary),
        _hyperparameters_section(summary),
        _usage_section(repo_id),
    ]
    if summary.resumable:
        sections.append(_resume_section(repo_id))
    return "\n".join(sections)


def _metrics_section(summary: RunSummary) -> str:
    if not summary.metrics:
        return "## Results\n\nNo metrics were logged.\n"
    at = f" at step {summary.step}" if summary.step is not None else ""
    rows = "".join(f"| {name} | {value:.4f} |\n" for name, value in sorted(summary.metrics.items()))
    return f"## Results\n\nMetrics{at}:\n\n| metric | value |\n|---|---|\n{rows}"


def _hyperparameters_section(summary: RunSummary) -> str:
    if not summary.hyperparameters:
        return "## Training hyperparameters\n\nThe run folder had no `config.yaml`.\n"
    dumped = yaml.safe_dump(summary.hyperparameters, sort_keys=False).strip()
    return (
        "## Training hyperparameters\n\nThe full resolved run config is `config.yaml` in this "
        f"repo; `lit-cats fit --config config.yaml` reruns it.\n\n```yaml\n{dumped}\n```\n"
    )


def _usage_section(repo_id: str) -> str:
    # return_dict=True works on transformers 4 and 5; generation keeps the model's own EOS list.
    return f"""## How to use

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
messages = [{{"role": "user", "content": "Why does my cat stare into the void?"}}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
).to(model.device)
output = model.generate(**inputs, max_new_tokens=128)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""


def _resume_section(repo_id: str) -> str:
    return f"""## Resume training

`{CHECKPOINT_FOLDER}/` holds the latest resumable checkpoint (adapter, optimizer, loop state):

```bash
hf download {repo_id} --include "{CHECKPOINT_FOLDER}/*" --local-dir resume
lit-cats fit --config resume/{CHECKPOINT_FOLDER}/{CONFIG_FILENAME} \\
  --ckpt_path resume/{CHECKPOINT_FOLDER}/{CHECKPOINT_FILENAME}
```
"""


def _is_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).exists()


def _init_args(section: Any) -> dict[str, Any]:
    """Arguments of a config section, plain or ``class_path``/``init_args``."""
    if not isinstance(section, dict):
        return {}
    return section.get("init_args", section) if "class_path" in section else section


def _read_yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------------------ pushing
def is_retryable(exc: BaseException) -> bool:
    """Whether a push error is transient: network failure, timeout, rate limit or 5xx."""
    while exc is not None:  # huggingface_hub wraps LFS upload errors in RuntimeError
        if isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True  # the builtins cover storage backends that do not use httpx2 (hf_xet)
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            return exc.response.status_code in _RETRYABLE_STATUS
        exc = exc.__cause__  # type: ignore[assignment]
    return False


def call_with_retries(fn: Callable[[], T], max_retries: int, backoff_s: float) -> T:
    """Call ``fn``, retrying transient errors with exponential backoff (``backoff_s * 2**i``)."""
    for attempt in range(max_retries + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == max_retries or not is_retryable(exc):
                raise
            delay = backoff_s * 2**attempt
            log.warning(
                f"Hub push failed ({type(exc).__name__}: {exc}); "
                f"retry {attempt + 1}/{max_retries} in {delay:.1f}s"
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


class HubPusher:
    """Commits upload plans to one Hub repo, creating the repo (and branch) first.

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

    def _push_once(self, build_plan: Callable[[str], UploadPlan], message: str) -> str:
        api = HfApi()  # built per push: it reads the endpoint (HF_ENDPOINT) when constructed
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


def write_card(path: Path, repo_id: str, summary: RunSummary) -> Path:
    """Render the model card for ``repo_id`` into ``path`` and return it."""
    path.write_text(render_model_card(repo_id, summary))
    return path


def read_tensorboard_scalars(run_dir: Path) -> tuple[dict[str, float], int | None]:
    """Last value of every scalar logged to TensorBoard in ``run_dir``, and its last step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = [tag for tag in accumulator.Tags().get("scalars", []) if tag != "hp_metric"]
    last = {tag: accumulator.Scalars(tag)[-1] for tag in tags}  # hp_metric: Lightning's placeholder
    steps = [event.step for event in last.values()]
    return {tag: event.value for tag, event in last.items()}, max(steps, default=None)


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
        raise FileNotFoundError(
            f"No adapter in {adapter_dir} (adapter_config.json is missing). Pass a run folder "
            "written by `lit-cats fit` (e.g. logs/phi3-cats/version_0) whose training finished."
        )
    metrics, step = read_tensorboard_scalars(run_dir)
    summary = summarize_run(run_dir, adapter_dir, metrics, step)
    pusher = HubPusher(repo_id, run_name(run_dir), private, revision, dry_run_dir)

    def build_plan(resolved_repo_id: str) -> UploadPlan:
        card = write_card(run_dir / CARD_FILENAME, resolved_repo_id, summary)
        return {**run_plan(run_dir, adapter_dir), CARD_FILENAME: card}

    print(pusher.push(build_plan, f"Upload adapter from {run_dir}"))
