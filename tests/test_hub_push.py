"""HubPushCallback and ``push_run`` against a real-HTTP fake Hub (tests/hub_server.py).

Runs go through LightningCLI with a stand-in module whose ``save_adapter`` writes real files in
PEFT layout, so the callback sees what it sees with ``QLoRAModule``: a ``config.yaml`` from
SaveConfigCallback, ModelCheckpoint files, TensorBoard logs and ``<log_dir>/adapter``. The
error-classification tests provoke real failures with ``HfApi`` (whichever HTTP client the
installed huggingface_hub uses) and check that lit-cats retries only what a retry can fix.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from hub_server import FakeHub
from huggingface_hub import HfApi, constants, errors
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import SingleDeviceStrategy
from safetensors.torch import load, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lit_cats
from lit_cats.callbacks import HubPushCallback
from lit_cats.hub import is_retryable, push_run

TOKEN = "hf_litcatsTESTtoken0123456789"  # distinctive, so a leak is found by a byte search
BASE = "microsoft/Phi-3-mini-4k-instruct"
DATASET = "leonvanbokhorst/existential-cat-memes-v1"
REPO = "cat-lover/cats-run"  # FakeHub's user + the TensorBoard experiment name
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"


class AdapterModule(L.LightningModule):
    """Stands in for QLoRAModule: a linear "adapter" saved in PEFT layout with a tokenizer."""

    def __init__(self, model_name_or_path: str = BASE, load_in_4bit: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lora = nn.Linear(8, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self.lora(batch[0]), batch[1])
        self.log("loss/train", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        loss = F.mse_loss(self.lora(batch[0]), batch[1])
        self.log_dict({"loss/val": loss, "loss/val_ppl": loss.exp()})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def save_adapter(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {"lora_A.weight": self.lora.weight.detach().clone(), "pad": torch.ones(4096)}
        save_file(weights, path / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "base_model_name_or_path": BASE, "r": 8}
        (path / "adapter_config.json").write_text(json.dumps(config))
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
        (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        return path

    def on_train_end(self) -> None:
        log_dir = self.trainer.log_dir  # every rank asks: it is a broadcast
        if self.trainer.is_global_zero:
            self.save_adapter(Path(log_dir) / "adapter")


class RandomData(L.LightningDataModule):
    """32 random regression pairs, batches of 4."""

    def __init__(self, dataset: str = DATASET) -> None:
        super().__init__()
        self.save_hyperparameters()
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(32, 8, generator=generator), torch.randn(32, 1))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


def fit(
    tmp_path: Path, max_steps: int = 5, ckpt_path: str | None = None, **hub_args: Any
) -> tuple[Path, L.Trainer]:
    """Fit through LightningCLI with the hub callback; checkpoints every 2 steps."""
    callback_args = {"max_retries": 2, "retry_backoff_s": 0.01, "timeout_s": 30, **hub_args}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": max_steps,
            "val_check_interval": 4,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "cats-run"},
            },
            "callbacks": [
                {"class_path": "lit_cats.callbacks.HubPushCallback", "init_args": callback_args},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"every_n_train_steps": 2, "save_top_k": -1, "save_last": True},
                },
            ],
        },
        "ckpt_path": ckpt_path,
    }
    config_path = tmp_path / f"fit-{len(list(tmp_path.glob('fit-*.yaml')))}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(AdapterModule, RandomData, args=["fit", "--config", str(config_path)])
    assert cli.trainer.state.finished
    return Path(cli.trainer.log_dir), cli.trainer


def run_files(run_dir: Path) -> dict[str, bytes]:
    """What a final push must upload, read from the run folder."""
    adapter = run_dir / "adapter"
    files = {p.relative_to(adapter).as_posix(): p.read_bytes() for p in adapter.rglob("*")}
    return {**files, "config.yaml": (run_dir / "config.yaml").read_bytes()}


def assert_no_token(*roots: Path, texts: tuple[str, ...] = ()) -> None:
    leaks = [
        p
        for root in roots
        for p in root.rglob("*")
        if p.is_file() and TOKEN.encode() in p.read_bytes()
    ]
    assert not leaks, f"token written to {leaks}"
    assert not any(TOKEN in text for text in texts)


@pytest.fixture
def point_hub(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Returns a function aiming huggingface_hub at an endpoint, with the test token."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # conftest sets HF_HUB_OFFLINE and constants are read at import: patch the module values.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # With hf_xet installed large files go to Xet storage; the fake Hub speaks LFS instead.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)

    def point(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(constants, "ENDPOINT", url)  # what HfApi() reads

    return point


@pytest.fixture
def hub(point_hub: Callable[[str], None]) -> Iterator[FakeHub]:
    with FakeHub(token=TOKEN) as server:
        point_hub(server.url)
        yield server
        assert not server.unexpected, "the client called endpoints the fake Hub does not serve"


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once closed


def test_end_strategy_pushes_byte_identical_adapter_config_and_card(
    hub: FakeHub, tmp_path: Path
) -> None:
    run_dir, _ = fit(tmp_path, strategy="end", private=True)

    assert [(c.repo_id, c.revision, c.message) for c in hub.commits] == [
        (REPO, "main", "End of training")
    ]
    assert hub.repos[REPO].private
    received = hub.files(REPO)
    assert received == {**run_files(run_dir), "README.md": (run_dir / "README.md").read_bytes()}
    assert "adapter_model.safetensors" in hub.lfs_paths  # went through LFS batch + PUT
    assert "config.yaml" not in hub.lfs_paths

    card = received["README.md"].decode()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["base_model"] == BASE
    assert metadata["datasets"] == [DATASET]
    assert metadata["library_name"] == "peft"
    assert {"lora", "qlora", f"base_model:adapter:{BASE}"} <= set(metadata["tags"])
    assert "| loss/val |" in card and "| loss/train |" in card
    assert f'AutoPeftModelForCausalLM.from_pretrained("{REPO}"' in card
    assert "lora_alpha" not in card and "model_name_or_path: " + BASE in card
    assert_no_token(tmp_path)


def test_every_save_commits_the_adapter_at_each_checkpoint(hub: FakeHub, tmp_path: Path) -> None:
    run_dir, _ = fit(tmp_path, strategy="every_save")

    assert [c.message for c in hub.commits] == [
        "Training in progress, step 2",
        "Training in progress, step 4",
        "End of training",
    ]
    adapters = [c.files["adapter_model.safetensors"] for c in hub.commits]
    assert len(set(adapters)) == 3  # each commit carries the weights of its own step
    assert all(not path.startswith("last-checkpoint/") for c in hub.commits for path in c.files)
    assert all(
        {"adapter_config.json", "README.md", "config.yaml"} <= set(c.files) for c in hub.commits
    )
    assert hub.files(REPO)["adapter_model.safetensors"] == adapters[-1]
    assert adapters[-1] == (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert b"at step 2" in hub.commits[0].files["README.md"]
    assert not (run_dir / ".hub-staging").exists()  # per-checkpoint exports are cleaned up


def test_checkpoint_strategy_keeps_a_resumable_last_checkpoint_on_a_branch(
    hub: FakeHub, tmp_path: Path
) -> None:
    # max_steps=6: the last save (step 6) happens after the last step, so the final commit
    # carries it; the step 2 and 4 saves get their own commits.
    run_dir, _ = fit(tmp_path, max_steps=6, strategy="checkpoint", revision="experiments")

    assert {c.revision for c in hub.commits} == {"experiments"}
    assert hub.files(REPO, "main") == {}
    assert [c.message for c in hub.commits] == [
        "Training in progress, step 2",
        "Training in progress, step 4",
        "End of training",
    ]
    assert all("last-checkpoint/last.ckpt" in c.files for c in hub.commits)
    received = hub.files(REPO, "experiments")
    local_checkpoint = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    assert received["last-checkpoint/last.ckpt"] == local_checkpoint
    assert received["last-checkpoint/config.yaml"] == (run_dir / "config.yaml").read_bytes()
    final_adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert received["last-checkpoint/adapter_model.safetensors"] == final_adapter
    assert "## Resume training" in received["README.md"].decode()

    # Resume from what the Hub holds: training goes on from step 6, not from scratch.
    downloaded = tmp_path / "from-hub.ckpt"
    downloaded.write_bytes(received["last-checkpoint/last.ckpt"])
    assert torch.load(downloaded, weights_only=False)["global_step"] == 6
    trainer = L.Trainer(
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path / "resumed",  # where on_train_end writes the adapter
    )
    trainer.fit(AdapterModule(), RandomData(), ckpt_path=downloaded)
    assert trainer.global_step == 8


@pytest.mark.parametrize("failure", ["server answers 500", "nothing listening"])
def test_failed_push_leaves_a_finished_run_and_the_retry_command(
    point_hub: Callable[[str], None],
    tmp_path: Path,
    failure: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lit_cats.hub.pusher")  # the retries, not shown
    with FakeHub(token=TOKEN, always_fail=True) as server:
        point_hub(server.url if failure == "server answers 500" else closed_port_url())
        with pytest.warns(UserWarning, match="push of the final adapter failed") as warned:
            run_dir, trainer = fit(tmp_path, strategy="checkpoint", repo_id="cat-lover/saved")

    assert trainer.state.finished and trainer.global_step == 5
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    messages = [str(w.message) for w in warned]
    # Three pushes failed (two checkpoints and the final one): one warning says it all.
    (final,) = [m for m in messages if "push" in m.lower() and "Hub" in m]
    assert f"lit-cats push {run_dir} --repo_id cat-lover/saved" in final
    assert str(run_dir / "adapter") in final
    assert "as did 2 checkpoint push(es)" in final
    assert "Traceback" not in final and len(final.splitlines()) == 2  # the reason, the command
    if failure == "server answers 500":  # each of the 3 pushes tried 1 + max_retries times
        assert server.requests.count(("POST", "/api/repos/create")) == 3 * 3
        assert not server.commits
    else:
        assert "could not be reached" in final
    assert "retry 2/2" in caplog.text  # retried with backoff before giving up
    assert not any(r.levelno >= logging.WARNING for r in caplog.records if "lit_cats" in r.name)
    assert_no_token(tmp_path, texts=(*messages, caplog.text))


def test_transient_errors_are_retried_until_the_push_succeeds(
    point_hub: Callable[[str], None], tmp_path: Path
) -> None:
    with FakeHub(token=TOKEN, fail_first=2) as server:
        point_hub(server.url)
        fit(tmp_path, strategy="end")
    assert server.requests[:3] == [("GET", "/api/whoami-v2")] * 3
    assert [c.message for c in server.commits] == ["End of training"]


def test_rejected_token_fails_fast_without_retries(
    point_hub: Callable[[str], None], tmp_path: Path
) -> None:
    with FakeHub(token="hf_another_token") as server:
        point_hub(server.url)
        with pytest.warns(UserWarning, match="lit-cats push"):
            fit(tmp_path, strategy="end", repo_id="cat-lover/saved")
    assert server.requests.count(("POST", "/api/repos/create")) == 1  # a 401 is not retried
    assert not server.unexpected


def raised_by(call: Callable[[], object]) -> Exception:
    """The exception ``call`` raises."""
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("expected an exception")


def create_repo() -> object:
    """One Hub request, with the endpoint and token that ``point_hub`` set."""
    return HfApi().create_repo("cat-lover/void")


def test_a_network_failure_during_push_is_retryable(point_hub: Callable[[str], None]) -> None:
    point_hub(closed_port_url())
    error = raised_by(create_repo)

    # huggingface_hub.errors.HTTPError is its HTTP client's root error (httpx's in 1.x, httpx2's
    # in 2.x); without an answer from the Hub it is not an HfHubHTTPError.
    assert isinstance(error, errors.HTTPError) and not isinstance(error, errors.HfHubHTTPError)
    assert is_retryable(error)
    wrapped = RuntimeError("Error while uploading 'adapter_model.safetensors' to the Hub.")
    wrapped.__cause__ = error  # how huggingface_hub reports a failed LFS upload
    assert is_retryable(wrapped)


@pytest.mark.parametrize(
    ("hub_args", "status", "retryable"),
    [({"always_fail": True}, 500, True), ({"token": "hf_another_token"}, 401, False)],
    ids=["server error is retried", "rejected token is not"],
)
def test_a_hub_answer_is_retryable_by_its_status(
    point_hub: Callable[[str], None], hub_args: dict[str, Any], status: int, retryable: bool
) -> None:
    with FakeHub(**{"token": TOKEN, **hub_args}) as server:
        point_hub(server.url)
        error = raised_by(create_repo)
    assert isinstance(error, errors.HfHubHTTPError) and error.response.status_code == status
    assert is_retryable(error) is retryable


def test_offline_mode_and_local_file_errors_are_not_retried(
    point_hub: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    point_hub(closed_port_url())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    error = raised_by(create_repo)
    assert isinstance(error, errors.OfflineModeIsEnabled)  # a ConnectionError, yet no outage
    assert not is_retryable(error)
    assert not is_retryable(FileNotFoundError("adapter/adapter_model.safetensors"))


def test_lit_cats_leaves_the_http_client_to_huggingface_hub() -> None:
    # huggingface_hub 1.x speaks httpx and 2.x httpx2: importing either would pin one major.
    imported = set()
    for path in Path(lit_cats.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    assert not imported & {"httpx", "httpx2", "requests"}


def test_dry_run_writes_exactly_what_would_be_uploaded(
    point_hub: Callable[[str], None], tmp_path: Path
) -> None:
    point_hub(closed_port_url())  # any network use would fail the push
    dry = tmp_path / "dry"
    run_dir, _ = fit(tmp_path, strategy="checkpoint", repo_id=REPO, dry_run_dir=str(dry))

    written = {p.relative_to(dry).as_posix(): p.read_bytes() for p in dry.rglob("*") if p.is_file()}
    root = {k: v for k, v in written.items() if not k.startswith("last-checkpoint/")}
    assert root == {**run_files(run_dir), "README.md": (run_dir / "README.md").read_bytes()}
    checkpoint = {
        k.removeprefix("last-checkpoint/"): v for k, v in written.items() if k not in root
    }
    assert set(checkpoint) == set(run_files(run_dir)) | {"last.ckpt"}
    assert checkpoint["last.ckpt"] == (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    assert checkpoint["config.yaml"] == (run_dir / "config.yaml").read_bytes()
    # The folder's adapter is the one of its checkpoint (step 4), not the final one (step 5).
    state = torch.load(io.BytesIO(checkpoint["last.ckpt"]), weights_only=False)["state_dict"]
    adapter = load(checkpoint["adapter_model.safetensors"])
    assert torch.equal(adapter["lora_A.weight"], state["lora.weight"])
    assert_no_token(tmp_path)


def test_push_run_pushes_an_existing_run_folder_later(
    point_hub: Callable[[str], None], tmp_path: Path
) -> None:
    point_hub(closed_port_url())
    with pytest.warns(UserWarning, match="lit-cats push"):
        run_dir, _ = fit(tmp_path, strategy="end", repo_id="cat-lover/later")

    with FakeHub(token=TOKEN) as server:
        point_hub(server.url)
        push_run(str(run_dir), repo_id="cat-lover/later", private=True)

    assert [c.message for c in server.commits] == [f"Upload adapter from {run_dir}"]
    received = server.files("cat-lover/later")
    assert received == {**run_files(run_dir), "README.md": (run_dir / "README.md").read_bytes()}
    card = received["README.md"].decode()
    assert "| loss/val |" in card and "hp_metric" not in card  # read back from TensorBoard
    assert server.repos["cat-lover/later"].private
    with pytest.raises(FileNotFoundError, match="No adapter"):
        push_run(str(tmp_path))


def test_push_run_dry_run_needs_no_network(
    point_hub: Callable[[str], None], tmp_path: Path
) -> None:
    point_hub(closed_port_url())
    run_dir, _ = fit(tmp_path, strategy="end", dry_run_dir=str(tmp_path / "first"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    push_run(str(run_dir / "adapter"), dry_run_dir=str(tmp_path / "later"))
    # The run folder is the record of the run: a dry run leaves it as it was (its README too).
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    assert after == before
    later = tmp_path / "later"
    assert (later / "adapter_model.safetensors").read_bytes() == (
        run_dir / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert "<your-username>/cats-run" in (later / "README.md").read_text()


def test_push_warns_when_vllm_could_not_serve_the_adapter(
    point_hub: Callable[[str], None], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    point_hub(closed_port_url())
    run_dir, _ = fit(tmp_path, strategy="end", dry_run_dir=str(tmp_path / "first"))
    push_run(str(run_dir), dry_run_dir=str(tmp_path / "plain"))
    assert "vLLM" not in capsys.readouterr().err  # the recipe's adapter: nothing to say
    config_file = run_dir / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 64, "modules_to_save": ["lm_head"]}))
    push_run(str(run_dir), dry_run_dir=str(tmp_path / "wide"))
    err = capsys.readouterr().err
    assert "warning:" in err and "--max-lora-rank 64" in err and "modules_to_save" in err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "sometimes"}, "'end', 'every_save', 'checkpoint'"),
        ({"repo_id": "owner/name/extra"}, "owner/name"),
        ({"timeout_s": 0}, "timeout_s"),
    ],
)
def test_invalid_arguments_are_rejected_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HubPushCallback(**kwargs)


def test_only_rank_zero_pushes(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Play a non-zero rank of a multi-GPU run: the callback must stay off the network and disk.
    monkeypatch.setattr(SingleDeviceStrategy, "is_global_zero", property(lambda self: False))
    run_dir, _ = fit(tmp_path, strategy="checkpoint")
    assert hub.requests == []
    assert not (run_dir / ".hub-staging").exists() and not (run_dir / "README.md").exists()


def test_a_bare_repo_name_goes_under_the_logged_in_user(hub: FakeHub, tmp_path: Path) -> None:
    # configs/qlora.yaml names the original's repo without an owner, as the original did.
    fit(tmp_path, strategy="end", repo_id="phi-3-mini-4k-instruct-existential-cats-v1")
    assert [c.repo_id for c in hub.commits] == [
        "cat-lover/phi-3-mini-4k-instruct-existential-cats-v1"
    ]


def test_a_resumed_runs_pushed_config_reruns_it_from_scratch(
    point_hub: Callable[[str], None], tmp_path: Path
) -> None:
    point_hub(closed_port_url())
    first, _ = fit(tmp_path, max_steps=4, strategy="end", dry_run_dir=str(tmp_path / "dry-1"))
    checkpoint = str(first / "checkpoints" / "last.ckpt")
    dry = tmp_path / "dry-2"
    resumed, _ = fit(tmp_path, max_steps=6, ckpt_path=checkpoint, dry_run_dir=str(dry))

    own = yaml.safe_load((resumed / "config.yaml").read_text())
    assert own["ckpt_path"] == checkpoint  # the run's own record says how it was started
    pushed = yaml.safe_load((dry / "config.yaml").read_text())
    assert pushed == {**own, "ckpt_path": None}
    assert "`lit-cats fit --config config.yaml` reruns it" in (dry / "README.md").read_text()
    # What the card says to run: the same settings, trained from step 0.
    rerun = LightningCLI(
        AdapterModule, RandomData, args=["fit", "--config", str(dry / "config.yaml")]
    )
    assert rerun.trainer.ckpt_path is None and rerun.trainer.global_step == 6


def test_staging_left_by_a_killed_run_is_removed_on_the_next_start(
    point_hub: Callable[[str], None], tmp_path: Path
) -> None:
    point_hub(closed_port_url())
    first, _ = fit(tmp_path, strategy="checkpoint", dry_run_dir=str(tmp_path / "dry"))
    assert not (first / ".hub-staging").exists()  # each push's copies go once it is done
    stale = first / ".hub-staging" / "step-2"  # what a run killed mid-upload leaves behind
    stale.mkdir(parents=True)
    (stale / "last.ckpt").write_bytes(b"half a checkpoint")
    second, _ = fit(tmp_path, strategy="checkpoint", dry_run_dir=str(tmp_path / "dry"))
    assert second != first
    assert not (first / ".hub-staging").exists() and not (second / ".hub-staging").exists()
