"""`lit-cats export`: GGUF metadata and weights read back, the Modelfile, refusals, and the
round trip through llama.cpp (llama-cpp-python): greedy answers equal the merged model's."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from conftest import CONFIGS, save_random_adapter
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from lit_cats.cli import main
from lit_cats.data.collate import collate
from lit_cats.data.formatting import tokenize_row
from lit_cats.data.prompts import load_prompts
from lit_cats.errors import UsageError
from lit_cats.export.modelfile import chat_turns
from lit_cats.inference.generation import GenerationSettings, encode_prompt
from lit_cats.inference.merge import CHECK_COLUMNS, merge_adapter
from lit_cats.recipe import load_base
from lit_cats.tiny import PHI3_STOP_TOKENS, TINY_MODEL_ID

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
#: What the adapter is trained to answer to the eight predict prompts, in their order.
ANSWERS = [
    "Because gravity must be tested. Daily.",
    "The red dot is the void, and I chase it anyway.",
    "Empty bowl. Empty soul. Feed me, human.",
    "I stare at the wall. The wall stares back.",
    "If I fits, I sits. If I not fits, I still sits.",
    "I hide under the bed until the roaring beast sleeps.",
    "Nine lives, then a nap that never ends.",
    "The human opens the cans. I am in charge.",
]
#: Longest answer compared, in tokens, and how many of the eight must agree, per type.
NEW_TOKENS = 32
MUST_AGREE = {"bf16": 8, "f16": 8, "q8_0": 7}


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """The eight prompts of configs/predict.yaml."""
    return load_prompts(yaml.safe_load((CONFIGS / "predict.yaml").read_text())["data"]["prompts"])


def train_adapter(base: str, tokenizer, prompts: list[str], folder: Path) -> Path:
    """An adapter on every linear kind of ``base``, trained (fp32, a few seconds) to give each
    prompt its answer in :data:`ANSWERS`, then the end token, and saved as fit does.

    Not a random adapter: a random tiny model's next-token choices are often near-ties (top-2
    logits within 1e-3), which any change of arithmetic flips. A trained answer has clear
    margins, so a disagreement means a conversion error, and the answers end with the
    template's end token, so stopping is tested as well.
    """
    torch.manual_seed(0)
    model = load_base(base, load_in_4bit=False, dtype="float32")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    rows = [{"prompt": p, "response": a} for p, a in zip(prompts, ANSWERS, strict=True)]
    examples = [tokenize_row(tokenizer, r, "prompt_response", CHECK_COLUMNS, 256) for r in rows]
    batch = collate(examples, tokenizer.pad_token_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(60):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"the adapter did not learn the answers (loss {loss.item():.3f})"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tokenizer, prompts) -> Path:
    """The tiny model's adapter that answers the predict prompts (see :func:`train_adapter`)."""
    return train_adapter(
        TINY_MODEL_ID, tokenizer, prompts, tmp_path_factory.mktemp("run") / "adapter"
    )


@pytest.fixture(scope="module")
def export(adapter, tmp_path_factory):
    """``export(dtype)``: the folder ``lit-cats export --dtype <dtype>`` wrote (once per type)."""
    done: dict[str, Path] = {}

    def run(dtype: str) -> Path:
        if dtype not in done:
            out = tmp_path_factory.mktemp(f"export-{dtype}")
            main(["export", "--adapter", str(adapter), "--output_dir", str(out),
                  "--dtype", dtype, "--device", "cpu"])  # fmt: skip
            done[dtype] = out
        return done[dtype]

    return run


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory) -> Path:
    """The adapter merged by `lit-cats merge` (bf16), the model the GGUF must reproduce."""
    out = tmp_path_factory.mktemp("merged")
    merge_adapter(str(adapter), str(out), dtype="bfloat16", device="cpu")
    return out


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


# ------------------------------------------------------------------------------ the GGUF file
def test_metadata_matches_the_model_config(export, merged, tokenizer):
    fields = _fields(export("f16") / "model-f16.gguf")
    config = AutoConfig.from_pretrained(merged)
    assert fields["general.architecture"] == "phi3"
    assert fields["phi3.context_length"] == config.max_position_embeddings
    assert fields["phi3.rope.scaling.original_context_length"] == (
        config.original_max_position_embeddings
    )
    assert fields["phi3.rope.freq_base"] == config.rope_parameters["rope_theta"]
    head_dim = config.hidden_size // config.num_attention_heads
    assert fields["phi3.rope.dimension_count"] == head_dim
    assert fields["phi3.attention.sliding_window"] == config.sliding_window
    assert fields["phi3.block_count"] == config.num_hidden_layers
    assert fields["phi3.embedding_length"] == config.hidden_size
    assert fields["phi3.feed_forward_length"] == config.intermediate_size
    assert fields["phi3.attention.head_count"] == config.num_attention_heads
    assert fields["phi3.attention.head_count_kv"] == config.num_key_value_heads
    assert fields["phi3.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)


def test_tokenizer_metadata_matches_the_tokenizer(export, merged, tokenizer):
    fields = _fields(export("f16") / "model-f16.gguf")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|end|>")
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the tokenizer adds no BOS either
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == AutoConfig.from_pretrained(merged).vocab_size  # one per embedding row
    for token, i in tokenizer.get_vocab().items():
        assert tokens[i] == token
    kinds = fields["tokenizer.ggml.token_type"]
    assert all(kinds[tokenizer.convert_tokens_to_ids(t)] == gguf.TokenType.CONTROL
               for t in PHI3_STOP_TOKENS)  # fmt: skip
    assert kinds[len(tokenizer)] == gguf.TokenType.UNUSED  # rows past the tokenizer


def test_bf16_weights_are_the_merged_weights_exactly(export, merged, tiny_path):
    reader = gguf.GGUFReader(export("bf16") / "model-bf16.gguf")
    weights = load_file(merged / "model.safetensors")
    base = load_file(tiny_path / "model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, 2)
    assert len(reader.tensors) == len(weights)
    changed = 0
    for key, expected in weights.items():
        name = names.get_name(key, try_suffixes=(".weight",))
        tensor = next(t for t in reader.tensors if t.name == name)
        kind = (
            gguf.GGMLQuantizationType.F32 if expected.ndim == 1 else gguf.GGMLQuantizationType.BF16
        )
        assert tensor.tensor_type == kind, key
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        np.testing.assert_array_equal(got, expected.float().numpy(), err_msg=key)
        changed += not torch.equal(expected, base[key])
    assert changed >= 2 * len(TARGETS)  # the merge changed every adapted matrix


def test_q8_0_quantizes_every_matrix(export, merged):
    reader = gguf.GGUFReader(export("q8_0") / "model-q8_0.gguf")
    assert _fields(export("q8_0") / "model-q8_0.gguf")["general.file_type"] == (
        gguf.LlamaFileType.MOSTLY_Q8_0
    )
    weights = load_file(merged / "model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, 2)
    for key, expected in weights.items():
        tensor = next(t for t in reader.tensors if t.name == names.get_name(key, (".weight",)))
        if expected.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
        got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        error = (got.reshape(expected.shape) - expected.float()).norm() / expected.float().norm()
        assert error < 0.01, key


# ------------------------------------------------------------------------------ the Modelfile
def _modelfile(folder: Path) -> tuple[dict[str, str], str, list[str], dict[str, str]]:
    """``FROM``, ``TEMPLATE``, the stops and the other parameters of an Ollama Modelfile."""
    text = (folder / "Modelfile").read_text()
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert template is not None
    rest = text.replace(template.group(0), "")
    lines = [line for line in rest.splitlines() if line and not line.startswith("#")]
    instructions = dict(line.split(" ", 1) for line in lines if not line.startswith("PARAMETER"))
    params = [line.split(" ", 2)[1:] for line in lines if line.startswith("PARAMETER")]
    stops = [value.strip('"') for key, value in params if key == "stop"]
    return instructions, template.group(1), stops, {k: v for k, v in params if k != "stop"}


def _render_go(template: str, values: dict[str, str]) -> str:
    """Ollama's rendering of a template made of ``{{ if .X }}...{{ end }}`` and ``{{ .X }}``."""

    def cond(m: re.Match) -> str:
        return m.group(2) if values.get(m.group(1)) else ""

    text = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", cond, template, flags=re.S)
    if not values.get("Response"):  # Ollama cuts the last turn after .Response to generate
        text = text.split("{{ .Response }}")[0]
    text = re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values.get(m.group(1), ""), text)
    assert "{{" not in text, text
    return text


def test_modelfile_template_renders_as_the_chat_template(export, tokenizer):
    instructions, template, _, _ = _modelfile(export("f16"))
    assert instructions["FROM"] == "./model-f16.gguf"
    for system in (None, "You are a cat."):
        chat = [{"role": "user", "content": "Why the box?"}]
        chat = [{"role": "system", "content": system}, *chat] if system else chat
        expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        values = {"Prompt": "Why the box?", "System": system or ""}
        assert _render_go(template, values) == expected
    # a past turn: the answer closes with the template's end marker, as in training data
    past = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Meow"}]
    rendered = tokenizer.apply_chat_template(past, tokenize=False)
    assert rendered.startswith(_render_go(template, {"Prompt": "Hi", "Response": "Meow"}))


def test_modelfile_stops_on_every_stop_id_with_predicts_sampling(export, merged, tokenizer):
    _, _, stops, params = _modelfile(export("f16"))
    stop_ids = GenerationConfig.from_pretrained(merged).eos_token_id
    assert sorted(stops) == sorted(tokenizer.convert_ids_to_tokens(stop_ids))
    assert sorted(stops) == sorted(PHI3_STOP_TOKENS)
    defaults = GenerationSettings()
    assert float(params["temperature"]) == defaults.temperature
    assert float(params["top_p"]) == defaults.top_p
    assert int(params["top_k"]) == defaults.top_k
    assert int(params["num_predict"]) == defaults.max_new_tokens
    assert int(params["seed"]) == defaults.seed
    assert int(params["num_ctx"]) == AutoConfig.from_pretrained(merged).max_position_embeddings


def test_a_chat_template_without_fixed_turn_markers_is_refused(tiny_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | lower }}\n{% endfor %}"
    with pytest.raises(UsageError, match="cannot be written as an Ollama TEMPLATE"):
        chat_turns(tokenizer)


def test_latest_adapter_exports_next_to_its_run(adapter, run_dir, capsys):
    run = run_dir / "logs" / "tiny-cats" / "version_0"
    shutil.copytree(adapter, run / "adapter")
    main(["export", "--dtype", "q8_0", "--device", "cpu"])
    assert sorted(p.name for p in (run / "gguf").iterdir()) == ["Modelfile", "model-q8_0.gguf"]
    assert "ollama create tiny-cats-version-0 -f" in capsys.readouterr().out


# ------------------------------------------------------------------------------ refusals
def _refused(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *args, "--device", "cpu"])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_refuses_an_architecture_the_converter_does_not_know(tmp_path, capsys):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    base = LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "llama")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    adapter = save_random_adapter(model, tmp_path / "run" / "adapter", ["q_proj"], 4)
    err = _refused(capsys, ["--adapter", str(adapter), "--output_dir", str(tmp_path / "out")])
    assert "LlamaForCausalLM" in err and "Phi3ForCausalLM" in err
    assert not (tmp_path / "out").exists()


def test_refuses_an_adapter_that_cannot_be_merged(tmp_path, capsys):
    from peft import PromptTuningConfig, get_peft_model

    base = load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    get_peft_model(base, config).save_pretrained(tmp_path / "run" / "adapter")
    err = _refused(
        capsys, ["--adapter", str(tmp_path / "run"), "--output_dir", str(tmp_path / "out")]
    )
    assert "PROMPT_TUNING" in err and "cannot be merged" in err
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_unless_asked(export, adapter, capsys):
    out = export("f16")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["--adapter", str(adapter), "--output_dir", str(out), "--dtype", "f16"]
    err = _refused(capsys, args)
    assert "--overwrite" in err and "model-f16.gguf" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "Modelfile").write_text("stale")
    main(["export", *args, "--device", "cpu", "--overwrite", "true"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # same adapter, same files
    printed = capsys.readouterr().out
    assert "ollama create" in printed
    # predict's sampling, and the way to q4_K_M from this 16-bit file
    assert "--temp 0.7 --top-p 0.9 --top-k 50 -n 250" in printed
    assert "model-f16.gguf" in printed and "Q4_K_M" in printed


def test_a_quantized_export_points_to_a_16_bit_one_for_smaller_files(adapter, tmp_path, capsys):
    args = ["--adapter", str(adapter), "--output_dir", str(tmp_path), "--dtype", "q8_0"]
    main(["export", *args, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "export with --dtype f16 first, then llama-quantize" in printed


# ------------------------------------------------------------------------------ llama.cpp
def _llama_cpp():
    """llama-cpp-python; `make test` (and so CI) installs it, where its absence is a failure."""
    if os.environ.get("CI"):
        import llama_cpp

        return llama_cpp
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test)")


@pytest.fixture(scope="module")
def transformers_greedy(merged, tokenizer, prompts) -> list[list[int]]:
    """The merged tiny model's greedy answers to the predict prompts."""
    return _greedy_answers(merged, tokenizer, prompts)


def _greedy_answers(merged: Path, tokenizer, prompts: list[str]) -> list[list[int]]:
    """A merged model's greedy answer to each prompt (float32 arithmetic on its bf16 weights):
    up to :data:`NEW_TOKENS` tokens, through the first stop id, as predict stops."""
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    stops = GenerationConfig.from_pretrained(merged).eos_token_id
    answers = []
    with torch.inference_mode():
        for prompt in prompts:
            ids, answer = encode_prompt(tokenizer, prompt), []
            while len(answer) < NEW_TOKENS and (not answer or answer[-1] not in stops):
                answer.append(int(model(torch.tensor([ids + answer])).logits[0, -1].argmax()))
            answers.append(answer)
    return answers


def test_the_merged_model_gives_the_trained_answers_and_ends_them(transformers_greedy, tokenizer):
    """The reference is what the adapter learned (the merge mattered), ended by ``<|end|>``."""
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    for answer, expected in zip(transformers_greedy, ANSWERS, strict=True):
        assert answer[-1] == end
        assert tokenizer.decode(answer[:-1]).strip() == expected


def _load(llama_cpp, path: Path):
    """The GGUF in llama.cpp on the CPU, keeping every position's logits (``Llama.scores``)."""
    llm = llama_cpp.Llama(
        str(path), n_gpu_layers=0, n_ctx=256, n_threads=1, logits_all=True, verbose=False
    )
    return contextlib.closing(llm)


def _llama_greedy(llama_cpp, llm, ids: list[int]) -> list[int]:
    """llama.cpp's greedy answer: argmax of its logits, through the first end-of-generation
    token of the GGUF's vocabulary (llama.cpp's own stop rule), at most :data:`NEW_TOKENS`."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(ids)
    answer: list[int] = []
    while len(answer) < NEW_TOKENS and not (
        answer and llama_cpp.llama_vocab_is_eog(vocab, answer[-1])
    ):
        answer.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([answer[-1]])
    return answer


@pytest.mark.parametrize("dtype", ["bf16", "f16", "q8_0"])
def test_llama_cpp_greedy_decoding_matches_the_merged_model(
    dtype, export, tokenizer, prompts, transformers_greedy
):
    llama_cpp = _llama_cpp()
    answers = []
    with _load(llama_cpp, export(dtype) / f"model-{dtype}.gguf") as llm:
        for prompt in prompts:
            ids = encode_prompt(tokenizer, prompt)
            # llama.cpp's own tokenizer (gpt-2 pre-tokenizer, special tokens parsed) agrees
            assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
            answers.append(_llama_greedy(llama_cpp, llm, ids))
    agree = sum(a == b for a, b in zip(answers, transformers_greedy, strict=True))
    assert agree >= MUST_AGREE[dtype], f"{agree} of {len(prompts)} answers agree"


def test_llama_cpp_stops_on_the_templates_end_token(export, tokenizer, prompts):
    """llama.cpp's own generation (its sampler at temperature 0, its stop rule) ends each
    answer at ``<|end|>``, and gives the answer the adapter was trained on."""
    llama_cpp = _llama_cpp()
    with _load(llama_cpp, export("f16") / "model-f16.gguf") as llm:
        for prompt, expected in zip(prompts, ANSWERS, strict=True):
            text = tokenizer.decode(encode_prompt(tokenizer, prompt))
            out = llm.create_completion(text, max_tokens=NEW_TOKENS, temperature=0.0)
            assert out["choices"][0]["finish_reason"] == "stop", prompt
            assert out["choices"][0]["text"].strip() == expected


# ------------------------------------------------------------------- a SentencePiece tokenizer
@pytest.fixture(scope="module")
def sentencepiece_base(tmp_path_factory) -> Path:
    """A tiny Phi-3 whose tokenizer is SentencePiece like Phi-3's (BPE pieces with byte
    fallback, ``tokenizer.model`` next to ``tokenizer.json``, Phi-3's added tokens and chat
    template), trained on the shipped dataset: the other tokenizer kind export must handle."""
    import sentencepiece

    from lit_cats.assets import SHIPPED_DATASET, read_jsonl
    from lit_cats.tiny import PHI3_ADDED_TOKENS, PHI3_CHAT_TEMPLATE, build_tiny_model

    texts = [m["content"] for row in read_jsonl(SHIPPED_DATASET) for m in row["messages"]]
    folder = tmp_path_factory.mktemp("tiny-sentencepiece")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(folder / "tokenizer"),
        vocab_size=800, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    tokenizer = AutoTokenizer.from_pretrained(folder)  # transformers converts tokenizer.model
    tokenizer.add_special_tokens({"additional_special_tokens": list(PHI3_ADDED_TOKENS)})
    tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)  # writes tokenizer.json; tokenizer.model stays
    build_tiny_model(tokenizer).save_pretrained(folder)
    return folder


def test_sentencepiece_tokenizer_round_trip(sentencepiece_base, prompts, tmp_path):
    llama_cpp = _llama_cpp()
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_base)
    adapter = train_adapter(
        str(sentencepiece_base), tokenizer, prompts, tmp_path / "run" / "adapter"
    )
    main(["export", "--adapter", str(adapter), "--output_dir", str(tmp_path / "out"),
          "--dtype", "f16", "--device", "cpu"])  # fmt: skip
    fields = _fields(tmp_path / "out" / "model-f16.gguf")
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert len(fields["tokenizer.ggml.scores"]) == len(fields["tokenizer.ggml.tokens"])
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|end|>")
    merged = merge_adapter(str(adapter), str(tmp_path / "merged"), device="cpu").output_dir
    expected = _greedy_answers(merged, tokenizer, prompts)
    with _load(llama_cpp, tmp_path / "out" / "model-f16.gguf") as llm:
        for prompt, answer, text in zip(prompts, expected, ANSWERS, strict=True):
            assert tokenizer.decode(answer[:-1]).strip() == text  # the adapter's answer
            ids = encode_prompt(tokenizer, prompt)
            # no "▁" after <|user|>, as transformers encodes it (tokenizer.ggml.add_space_prefix)
            assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
            assert _llama_greedy(llama_cpp, llm, ids) == answer
