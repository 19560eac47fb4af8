"""QLoRA training on the tiny model through the real 4-bit path: what is trained, saved, resumed."""

from __future__ import annotations

import copy
from pathlib import Path

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from peft import PeftModel, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from lit_cats.data.datamodule import CatsDataModule
from lit_cats.model import QLoRAModule
from lit_cats.recipe import build_bnb_config, keep_cpu_4bit_weights_trainable, resolve_pretrained
from lit_cats.tiny import TINY_MODEL_ID


def _optimizer(params):
    return bnb.optim.PagedAdamW32bit(params, lr=3e-3, weight_decay=0.0)


class _Recorder(L.Callback):
    """Records per-step losses and the state a resumed run starts from."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.start_step: int | None = None
        self.start_optimizer: dict | None = None
        self.start_lora: dict[str, torch.Tensor] = {}
        self.start_lr_step: int | None = None
        self.batches: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step
        # A copy: torch optimizers hand out their live state tensors, updated in place later.
        self.start_optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.start_lr_step = trainer.lr_scheduler_configs[0].scheduler.last_epoch
        self.start_lora = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.batches.append(batch["input_ids"].clone())


def _fit(
    root: Path,
    max_steps: int,
    every: int | None = None,
    ckpt_path: str | None = None,
    accelerator: str = "cpu",
    optimizer=_optimizer,
    **model_kw,
) -> tuple[L.Trainer, QLoRAModule, _Recorder]:
    model = QLoRAModule(TINY_MODEL_ID, optimizer=optimizer, **model_kw)
    data = CatsDataModule("lit-cats/cat-memes", TINY_MODEL_ID, batch_size=8)
    recorder = _Recorder()
    callbacks: list[L.Callback] = [recorder]
    if every:
        callbacks.append(ModelCheckpoint(every_n_train_steps=every, save_top_k=-1, save_last=True))
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed",
        max_steps=max_steps,
        gradient_clip_val=0.3,
        logger=TensorBoardLogger(root, name="run"),
        callbacks=callbacks,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=2,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, recorder


def _frozen_snapshot(model: QLoRAModule) -> dict[str, torch.Tensor]:
    """Every frozen tensor, with the 4-bit weights' packed bytes and quantization scales."""
    snap = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        snap[name] = p.detach().clone()
        state = getattr(p, "quant_state", None)
        if state is not None:
            snap[name + ".absmax"] = state.absmax.clone()
    return snap


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 20-step run, checkpointing every 10 steps; base snapshotted before training."""
    root = tmp_path_factory.mktemp("trained")
    model = QLoRAModule(TINY_MODEL_ID, optimizer=_optimizer)
    model.configure_model()  # build now to snapshot; fit's own call is then a no-op
    before = _frozen_snapshot(model)
    data = CatsDataModule("lit-cats/cat-memes", TINY_MODEL_ID, batch_size=8)
    recorder = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=20,
        gradient_clip_val=0.3,
        logger=TensorBoardLogger(root, name="run"),
        callbacks=[recorder, ModelCheckpoint(every_n_train_steps=10, save_top_k=-1)],
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    return {"trainer": trainer, "model": model, "before": before, "recorder": recorder}


def test_loss_falls(trained):
    losses = trained["recorder"].losses
    assert len(losses) == 20
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3


def test_every_lora_b_is_trained(trained):
    lora_b = {n: p for n, p in trained["model"].named_parameters() if "lora_B" in n}
    assert len(lora_b) == 8  # 4 Phi-3 linear kinds x 2 layers
    assert all(p.abs().sum() > 0 for p in lora_b.values()), "a lora_B stayed zero (untrained)"


def test_validation_does_not_switch_4bit_layers_to_the_gradient_free_cpu_kernel(tmp_path):
    model = QLoRAModule(TINY_MODEL_ID, optimizer=_optimizer, lora_dropout=0.0)
    model.configure_model()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def lora_grads() -> list[torch.Tensor]:
        model.train()
        model.zero_grad()
        model.model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for n, p in model.named_parameters() if "lora_A" in n]

    before = lora_grads()
    model.eval()
    with torch.no_grad():  # what a validation pass does
        model.model(input_ids=ids)
    after = lora_grads()
    states = [p.quant_state for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)]
    assert not any(getattr(s, "packing_format_for_cpu", False) for s in states)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_base_weights_are_unchanged(trained):
    after = _frozen_snapshot(trained["model"])
    assert after.keys() == trained["before"].keys()
    for name, value in trained["before"].items():
        assert torch.equal(value, after[name]), name
    # The base really is 4-bit.
    assert any(isinstance(p, bnb.nn.Params4bit) for p in trained["model"].parameters())


def test_checkpoint_holds_only_the_adapter_and_is_small(trained):
    ckpt_path = Path(trained["trainer"].log_dir) / "checkpoints" / "epoch=0-step=20.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    trainable = {n: p for n, p in trained["model"].named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == set(trainable)
    assert all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["global_step"] == 20
    adapter_bytes = sum(p.numel() * 4 for p in trainable.values())
    # weights + two Adam moments, plus a little pickling overhead; never the base.
    assert ckpt_path.stat().st_size < 3 * adapter_bytes + 200_000


def test_final_adapter_reloads_with_identical_logits(trained):
    model, log_dir = trained["model"], Path(trained["trainer"].log_dir)
    adapter = log_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()
    }
    ids = torch.tensor([model.get_tokenizer()("I can haz meaning?")["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model.model(input_ids=ids).logits
    # What a user does: load the 4-bit base, prepare it the same way, attach the adapter.
    base = AutoModelForCausalLM.from_pretrained(
        resolve_pretrained(model.model.base_model.model.name_or_path),
        quantization_config=build_bnb_config(),
        dtype=torch.bfloat16,
        device_map={"": "cpu"},
    )
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    keep_cpu_4bit_weights_trainable(base)  # same CPU kernel as the trained module (see quant.py)
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.equal(expected, got)


def _torch_adamw(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)


RESUME_CASES = [
    pytest.param("cpu", _optimizer, id="cpu"),
    # Paged AdamW has had GPU save/resume bugs (bitsandbytes#782, #1381): check it for real.
    pytest.param("gpu", _optimizer, id="gpu-paged_adamw", marks=pytest.mark.gpu),
    pytest.param("gpu", _torch_adamw, id="gpu-adamw", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize(("accelerator", "optimizer"), RESUME_CASES)
def test_resume_continues_at_the_step_with_optimizer_state_and_data_order(
    tmp_path, accelerator, optimizer
):
    # Same seed for the LoRA init, no dropout: the two runs differ only by the interruption.
    kw = {"accelerator": accelerator, "optimizer": optimizer, "lora_dropout": 0.0}
    L.seed_everything(0)
    _, straight_model, straight = _fit(tmp_path / "straight", max_steps=10, **kw)
    L.seed_everything(0)
    first, _, _ = _fit(tmp_path, max_steps=6, every=3, **kw)
    last = Path(first.log_dir) / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6

    trainer, resumed_model, recorder = _fit(tmp_path, max_steps=10, ckpt_path=str(last), **kw)
    assert recorder.start_step == 6
    assert recorder.start_lr_step == 6
    assert trainer.global_step == 10 and len(recorder.losses) == 4
    # Mid-epoch resume: the next batches are the ones the uninterrupted run saw at steps 7-10.
    for resumed, uninterrupted in zip(recorder.batches, straight.batches[6:], strict=True):
        assert torch.equal(resumed, uninterrupted)
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(recorder.start_lora[name].cpu(), value), name
    saved, restored = ckpt["optimizer_states"][0]["state"], recorder.start_optimizer["state"]
    assert saved.keys() == restored.keys() and saved
    for idx, state in saved.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                assert torch.equal(value, restored[idx][key].cpu()), (idx, key)
    # Same batches, same updates: the adapter the uninterrupted run ends with.
    expected, got = straight_model.state_dict(), resumed_model.state_dict()
    assert expected.keys() == got.keys()
    assert all(got[n].abs().sum() > 0 for n in got if "lora_B" in n)
    for name in expected:
        # Only GPU reduction order may differ in the last bits.
        torch.testing.assert_close(got[name], expected[name], rtol=2e-3, atol=2e-5)


def test_checkpoint_from_other_lora_settings_is_refused(tmp_path):
    first, _, _ = _fit(tmp_path, max_steps=2, every=2)
    last = str(Path(first.log_dir) / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="same model, r and target_modules"):
        _fit(tmp_path, max_steps=4, ckpt_path=last, target_modules=["qkv_proj"])


def test_bad_hyperparameters_fail_at_construction():
    with pytest.raises(ValueError, match="rank"):
        QLoRAModule(TINY_MODEL_ID, r=0)
    with pytest.raises(ValueError, match="'fp8'"):
        QLoRAModule(TINY_MODEL_ID, bnb_4bit_compute_dtype="fp8")
