"""The model card (the repo's ``README.md``) and the run facts it reports.

:func:`summarize_run` reads what the card says about a run (base model, dataset,
hyperparameters) from the run's ``config.yaml`` and adapter config; the metrics come from the
trainer during ``fit`` or from TensorBoard (:func:`read_tensorboard_scalars`) for a finished
run. :func:`render_model_card` turns that into Hub metadata (so the Hub links the adapter to
its base model and dataset) plus results, hyperparameters and usage sections.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData

from lit_cats.hub.plans import CHECKPOINT_FILENAME, CHECKPOINT_FOLDER, CONFIG_FILENAME
from lit_cats.inference import ADAPTER_CONFIG

_TRAINER_KEYS = (
    "max_epochs",
    "max_steps",
    "accumulate_grad_batches",
    "precision",
    "gradient_clip_val",
)


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


def read_tensorboard_scalars(run_dir: Path) -> tuple[dict[str, float], int | None]:
    """Last value of every scalar logged to TensorBoard in ``run_dir``, and its last step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = [tag for tag in accumulator.Tags().get("scalars", []) if tag != "hp_metric"]
    last = {tag: accumulator.Scalars(tag)[-1] for tag in tags}  # hp_metric: Lightning's placeholder
    steps = [event.step for event in last.values()]
    return {tag: event.value for tag, event in last.items()}, max(steps, default=None)


def write_card(path: Path, repo_id: str, summary: RunSummary) -> Path:
    """Render the model card for ``repo_id`` into ``path`` and return it."""
    path.write_text(render_model_card(repo_id, summary))
    return path


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
