"""``lit-cats serve`` on the tiny model, over loopback, with the official ``openai`` client.

Two servers run as a user starts them (``lit-cats serve`` subprocesses on free ports, in a folder
whose ``logs/`` holds a saved adapter): one with an API key from ``LIT_CATS_API_KEY`` and the
defaults, one without a key and with small limits, for the refusals.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, save_random_adapter

from lit_cats.cli import main
from lit_cats.inference.vllm import check_vllm_compatible
from lit_cats.recipe import load_base
from lit_cats.tiny import TINY_MODEL_ID

openai = pytest.importorskip("openai")
pytest.importorskip("litserve")

LIT_CATS = str(Path(sys.executable).with_name("lit-cats"))
STACK = ["--config", str(CONFIGS / "qlora.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
KEY = "sk-test-cats"
QUESTION = [{"role": "user", "content": "Why do you knock things off the table?"}]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def client(self, api_key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def post(self, body: bytes, key: str | None = None) -> tuple[int, dict]:
        """A raw POST to /v1/chat/completions: its status and JSON body."""
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{self.url}/v1/chat/completions", body, headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder: Path, name: str, *args: str, env: dict[str, str]) -> Server:
    port = _free_port()
    log = folder / f"{name}.log"
    process = subprocess.Popen(
        [LIT_CATS, "serve", *STACK, "--port", str(port), *args],
        cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return Server(f"http://127.0.0.1:{port}", process, log)


def _wait_ready(server: Server, key: str | None = None, timeout: float = 180) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log.read_text()[-3000:]
        try:
            request = urllib.request.Request(f"{server.url}/health", headers=headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise AssertionError("server not ready:\n" + server.log.read_text()[-3000:])


def _stop(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path) -> Iterator[dict]:
    """``{"keyed": Server, "open": Server}``, both serving a random tiny adapter (``latest``)."""
    folder = tmp_path_factory.mktemp("serve")
    base = load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")
    torch.manual_seed(0)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    save_random_adapter(base, folder / "logs/tiny-cats/version_0/adapter", targets, 4)
    short = ["--model.generation.max_new_tokens", "16"]
    keyed = _start(folder, "keyed", *short, env={"LIT_CATS_API_KEY": KEY})
    limits = ["--max_tokens", "32", "--max_prompt_tokens", "40", "--max_concurrent_requests", "2"]
    open_ = _start(folder, "open", *limits, "--model_id", "tiny-cat", env={"LIT_CATS_API_KEY": ""})
    try:
        _wait_ready(keyed, KEY)
        _wait_ready(open_)
        yield {"keyed": keyed, "open": open_}
    finally:
        _stop(keyed)
        _stop(open_)


def test_start_up_lines_name_the_adapter_and_say_whether_a_key_is_needed(servers):
    keyed, open_ = servers["keyed"].log.read_text(), servers["open"].log.read_text()
    adapter = "lit-cats/tiny-phi3 + adapter logs/tiny-cats/version_0/adapter"
    assert f"lit-cats serve: {adapter}" in keyed and f"lit-cats serve: {adapter}" in open_
    assert "API key required" in keyed and "No API key" not in keyed
    assert "No API key" in open_ and "anyone who can reach port" in open_


def test_chat_completion(servers):
    reply = servers["keyed"].client(KEY).chat.completions.create(model="x", messages=QUESTION)
    [choice] = reply.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert reply.usage.prompt_tokens > 5
    # The served default is predict's max_new_tokens (16 here), unless the model stopped.
    assert 1 <= reply.usage.completion_tokens <= 16


def test_streamed_chunks_arrive_before_the_end(servers):
    client = servers["keyed"].client(KEY)
    arrivals, pieces, usage = [], [], None
    start = time.monotonic()
    stream = client.chat.completions.create(
        model="x", messages=QUESTION, stream=True, max_tokens=24, temperature=0
    )
    for chunk in stream:
        arrivals.append(time.monotonic() - start)
        pieces += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    text = "".join(pieces)
    assert text and len([p for p in pieces if p]) >= 3  # several pieces, not one at the end
    assert arrivals[0] < arrivals[-1]
    # Greedy (temperature 0): the same answer streamed and not.
    whole = client.chat.completions.create(
        model="x", messages=QUESTION, max_tokens=24, temperature=0
    )
    assert whole.choices[0].message.content == text
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_models_lists_the_served_model(servers):
    assert [m.id for m in servers["open"].client().models.list()] == ["tiny-cat"]
    reply = servers["open"].client().chat.completions.create(model="gpt-4", messages=QUESTION)
    assert reply.model == "tiny-cat"
    keyed = [m.id for m in servers["keyed"].client(KEY).models.list()]
    assert keyed == ["logs/tiny-cats/version_0/adapter"]


def test_api_key_is_required_when_set_and_not_otherwise(servers):
    for key in ("wrong", "none"):
        with pytest.raises(openai.AuthenticationError, match="Missing or wrong API key"):
            servers["keyed"].client(key).chat.completions.create(model="x", messages=QUESTION)
        with pytest.raises(openai.AuthenticationError):
            servers["keyed"].client(key).models.list()
    status, body = servers["keyed"].post(json.dumps({"messages": QUESTION}).encode())
    assert status == 401 and "API key" in body["error"]["message"]
    reply = servers["open"].client().chat.completions.create(model="x", messages=QUESTION)
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"model": "x"}', 400, "messages: Field required"),
        (b'{"messages": []}', 400, "messages is empty"),
        (b'{"messages": [{"role": "tool", "content": "x"}]}', 400, "messages[0].role is 'tool'"),
        (b'{"messages": [{"role": "user", "content": "' + b"meow " * 60 + b'"}]}', 400,
         "most 40 (--max_prompt_tokens)"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 33}', 400,
         "max_tokens must be between 1 and 32"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400,
         "max_tokens must be between 1 and 32"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n must be 1"),
        (b'{"messages": "hi"}', 400, "messages: Input should be a valid list"),
        (b'{"messages": [{"content": "hi"}]}', 400, "messages.0.role: Field required"),
        (b'[1, 2]', 400, "Invalid request"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 400,
         "temperature must be in [0, 2]"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', 400, "top_p"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url", '
         b'"image_url": "http://x/cat.png"}]}]}', 400, "only text content"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_4xx_that_says_why(servers, body, status, message):
    for stream in (False, True):  # checked before queueing: a stream gets the status too
        sent = body
        if stream and body.startswith(b'{"'):
            sent = b'{"stream": true, ' + body[1:]
        got, reply = servers["open"].post(sent)
        assert got == status, reply
        assert message in reply["error"]["message"]
        assert reply["error"]["type"] == "invalid_request_error"


def test_too_many_concurrent_requests_get_429_and_the_rest_complete(servers):
    client = servers["open"].client(timeout=120)

    def ask(_: int) -> str:
        try:
            client.chat.completions.create(model="x", messages=QUESTION, max_tokens=32)
            return "ok"
        except openai.RateLimitError as error:
            assert "--max_concurrent_requests" in str(error)
            return "429"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(ask, range(8)))
    assert "ok" in outcomes and "429" in outcomes  # the cap is 2
    assert servers["open"].client().models.list()  # still up


def test_load_32_concurrent_clients_all_complete_and_the_server_stays_up(servers):
    server = servers["keyed"]
    deadline = time.monotonic() + 4

    def client_loop(i: int) -> int:
        client = server.client(KEY, timeout=120)
        done = 0
        while done == 0 or time.monotonic() < deadline:
            messages = [{"role": "user", "content": f"Cat number {i}, request {done}: why?"}]
            # Some requests sample differently: batches mixing settings take the plain path.
            sampling = {"max_tokens": 8, "temperature": 0.3 if i % 4 == 0 else 0.7}
            if (i + done) % 2:
                chunks = client.chat.completions.create(
                    model="x", messages=messages, stream=True, **sampling
                )
                # Each stream ends properly (the tiny model may sample its end token first, so
                # an answer may be empty: that is not the server's doing).
                ends = [c.choices[0].finish_reason for c in chunks if c.choices]
                assert ends and ends[-1] is not None
            else:
                reply = client.chat.completions.create(model="x", messages=messages, **sampling)
                assert reply.usage.completion_tokens >= 1
            done += 1
        return done

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        counts = list(pool.map(client_loop, range(32)))
    assert all(n >= 1 for n in counts) and sum(counts) >= 32
    assert server.process.poll() is None
    assert server.client(KEY).models.list()


def test_a_host_litserve_cannot_bind_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *STACK, "--host", "10.1.2.3"])
    assert exit_info.value.code == 2
    assert "--host '10.1.2.3': LitServe listens on one of 127.0.0.1" in capsys.readouterr().err


def test_vllm_check_passes_the_recipe_and_names_what_vllm_refuses(tmp_path):
    base = load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")
    good = save_random_adapter(base, tmp_path / "good", ["qkv_proj", "o_proj"], 4)
    assert check_vllm_compatible(good) == []
    base = load_base(TINY_MODEL_ID, load_in_4bit=False, dtype="float32")
    bad = save_random_adapter(
        base, tmp_path / "bad", ["qkv_proj", "lm_head"], 32, modules_to_save=["embed_tokens"]
    )
    problems = " ".join(check_vllm_compatible(bad))
    assert "modules_to_save" in problems and "['lm_head']" in problems
    assert "--max-lora-rank 32" in problems
