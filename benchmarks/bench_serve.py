"""Serving speed: 8 concurrent streamed requests to ``lit-cats serve`` vs ``lit-cats predict``.

On one GPU: build a random-weight Phi-3-mini and a random r-16 adapter (``bench_generate.py``'s
``build_models``), then answer the eight prompts of ``configs/predict.yaml`` with 250 new tokens
each (forced: ``min_new_tokens`` = ``max_new_tokens``, so both arms make the same tokens), with
predict's sampling (T 0.7, top-p 0.9, top-k 50), two ways:

1. ``predict``: in this process, the model loaded as ``predict`` loads it (4-bit base, adapter,
   fused LoRA as ``configs/predict.yaml`` sets) and ``generate`` on the eight prompts in one
   batch (the fast decode loop where it applies): a warm-up run of the same shapes, then timed;
2. ``serve``: ``lit-cats serve`` started as a subprocess on the same folders (the model freed
   here first), eight client threads each streaming one prompt through the ``openai`` client
   at once; a warm-up round, then ``--rounds`` timed rounds, the best reported. Time runs from
   the first request sent to the last chunk received (HTTP, tokenization, queueing included).

The issue's target: ``serve`` reaches at least 80% of ``predict``'s tokens/s. Prints a table
and appends it, dated, with the GPU, versions and commit, to ``benchmarks/RESULTS.md``.

    python benchmarks/bench_serve.py            # GPU
    python benchmarks/bench_serve.py --tiny     # CPU smoke test: tiny model, 8 tokens
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a source checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_generate import _free, _sync, build_models, original_prompts  # noqa: E402
from bench_train import append_results, environment  # noqa: E402

from lit_cats.inference import decode  # noqa: E402
from lit_cats.inference.adapters import load_for_inference  # noqa: E402
from lit_cats.inference.generation import GenerationSettings, generate  # noqa: E402

TARGET = 0.8  # serve's share of predict's tokens/s (issue 22)


def predict_arm(base: str, adapter: str, prompts: list[str], tokens: int, device: str) -> dict:
    """``predict``'s path: one batch of every prompt, after a warm-up of the same shapes."""
    from lit_cats.fast.lora import enable_fast_lora

    model = load_for_inference(base, adapter, device=device)
    enable_fast_lora(model)  # as configs/predict.yaml (and serve's default) set
    tokenizer = tokenizer_of(adapter)
    settings = GenerationSettings(max_new_tokens=tokens, min_new_tokens=tokens, seed=0)
    generate(model, tokenizer, prompts, settings, batch_size=len(prompts))
    _sync(device)
    start = time.perf_counter()
    results = generate(model, tokenizer, prompts, settings, batch_size=len(prompts))
    _sync(device)
    seconds = time.perf_counter() - start
    made = sum(r.num_tokens for r in results)
    decode.release(model)
    del model
    _free()
    print(f"  predict: {made} tokens in {seconds:.2f} s ({made / seconds:,.1f} tok/s)", flush=True)
    return {"arm": "predict", "tokens": made, "seconds": seconds, "ttft": None}


def tokenizer_of(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: str, adapter: str, tokens: int, tiny: bool, log: Path) -> tuple[Any, str]:
    """``lit-cats serve`` on a free port, ready; the process and its URL."""
    port = _free_port()
    configs = ["--config", str(REPO / "configs" / "qlora.yaml")]
    if tiny:
        configs += ["--config", str(REPO / "configs" / "tiny.yaml")]
    command = [
        sys.executable, "-c", "from lit_cats.cli import main; main()", "serve", *configs,
        "--model.model_name_or_path", base, "--model.adapter", adapter,
        "--model.generation.max_new_tokens", str(tokens),
        "--model.generation.min_new_tokens", str(tokens),
        "--port", str(port), "--max_batch_size", "8", "--batch_timeout", "0.2",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=log.parent, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True, env={**os.environ, "LIT_CATS_API_KEY": ""},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("lit-cats serve exited:\n" + log.read_text()[-4000:])
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return process, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    stop_server(process)
    raise RuntimeError("lit-cats serve not ready in 10 minutes:\n" + log.read_text()[-4000:])


def stop_server(process: Any) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def one_round(url: str, prompts: list[str], tokens: int) -> dict:
    """Every prompt streamed by its own client thread, all at once; tokens and times."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()

    def ask(prompt: str) -> tuple[int, float, float]:
        first, made = None, 0
        chunks = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": prompt}], stream=True,
            max_tokens=tokens,
        )  # fmt: skip
        for chunk in chunks:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                made = chunk.usage.completion_tokens
        return made, first or 0.0, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    seconds = max(end for _, _, end in answers)
    made = sum(n for n, _, _ in answers)
    ttft = statistics.median(first for _, first, _ in answers)
    return {"arm": "serve", "tokens": made, "seconds": seconds, "ttft": ttft}


def serve_arm(
    base: str, adapter: str, prompts: list[str], tokens: int, tiny: bool, rounds: int, folder: Path
) -> dict:
    """A warm-up round (capture, first shapes), then ``rounds`` timed ones: the best."""
    process, url = start_server(base, adapter, tokens, tiny, folder / "serve.log")
    try:
        one_round(url, prompts, tokens)
        timed = []
        for i in range(rounds):
            row = one_round(url, prompts, tokens)
            rate = row["tokens"] / row["seconds"]
            print(
                f"  serve round {i + 1}: {row['tokens']} tokens in {row['seconds']:.2f} s "
                f"({rate:,.1f} tok/s), median first chunk {row['ttft'] * 1e3:.0f} ms",
                flush=True,
            )
            timed.append(row)
    finally:
        stop_server(process)
    return max(timed, key=lambda r: r["tokens"] / r["seconds"])


def table(rows: list[dict]) -> str:
    reference = rows[0]["tokens"] / rows[0]["seconds"]
    lines = [
        "| arm | requests | tokens | seconds | tok/s | share of predict | median first chunk ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = r["tokens"] / r["seconds"]
        ttft = "-" if r["ttft"] is None else f"{r['ttft'] * 1e3:.0f}"
        lines.append(
            f"| {r['arm']} | 8 | {r['tokens']} | {r['seconds']:.2f} | {rate:,.1f} | "
            f"{rate / reference:.0%} | {ttft} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke test)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="250 (tiny: 8)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the serve arm")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--note", default="", help="free text for the record")
    args = parser.parse_args(argv)
    tokens = args.max_new_tokens or (8 if args.tiny else 250)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU; use --tiny for the CPU smoke test")
    device = "cpu" if args.tiny else "cuda"
    prompts = original_prompts()
    with tempfile.TemporaryDirectory(prefix="lit-cats-bench-serve-") as tmp:
        base_dir, adapter_dir = build_models(Path(tmp), device, args.tiny)
        base, adapter = str(base_dir), str(adapter_dir)
        rows = [predict_arm(base, adapter, prompts, tokens, device)]
        rows.append(serve_arm(base, adapter, prompts, tokens, args.tiny, args.rounds, Path(tmp)))
    body = table(rows)
    share = (rows[1]["tokens"] / rows[1]["seconds"]) / (rows[0]["tokens"] / rows[0]["seconds"])
    verdict = "meets" if share >= TARGET else "misses"
    print(body)
    print(f"serve reaches {share:.0%} of predict's tokens/s: {verdict} the {TARGET:.0%} target")
    note = (
        f"8 prompts x {tokens} new tokens (forced), sampling T 0.7 / top-p 0.9 / top-k 50, "
        f"4-bit base + r-16 adapter, fused LoRA; serve: 8 concurrent streamed requests "
        f"(openai client, loopback), best of {args.rounds} rounds after a warm-up; "
        f"{verdict} the {TARGET:.0%} target" + (f"; {args.note}" if args.note else "")
    )
    append_results(args.results, environment(device), body, note, section="bench_serve")
    print(f"appended to {args.results}")
    return rows


if __name__ == "__main__":
    main()
