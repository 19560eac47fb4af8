"""A small in-memory Hugging Face Hub for offline tests, served over real HTTP on 127.0.0.1.

It speaks only the part of the Hub API that ``huggingface_hub`` (1.x and 2.x) calls to create a
repo and commit files with ``HfApi.create_commit``, checked against its source (``hf_api.py``,
``_commit_api.py``, ``lfs.py``):

======  ===============================================  ==========================================
Method  Path                                             Called by
======  ===============================================  ==========================================
GET     /api/whoami-v2                                   ``whoami`` (default repo id)
POST    /api/repos/create                                ``create_repo`` (409 when it exists)
GET     /api/models/{repo}                               ``repo_info`` (``create_repo`` on 401/403)
POST    /api/models/{repo}/branch/{branch}               ``create_branch`` (409 when it exists)
POST    /api/validate-yaml                               ``create_commit`` when README.md changes
POST    /api/models/{repo}/preupload/{revision}          ``create_commit``: regular or LFS per file
POST    /{repo}.git/info/lfs/objects/batch               LFS batch API: where to PUT each object
PUT     /lfs/{oid}                                       LFS "basic" transfer (no auth, like S3)
POST    /api/models/{repo}/commit/{revision}             ``create_commit``: the ndjson commit
GET     /api/agent-harnesses                             user-agent telemetry (empty registry)
======  ===============================================  ==========================================

Files whose name ends in a binary-weights suffix, or of 10 MB and more, are answered ``lfs``
(the real Hub decides from ``.gitattributes`` and size), so ``adapter_model.safetensors`` goes
through the LFS batch + PUT path. ``huggingface_hub`` uploads LFS files with Xet when ``hf_xet``
is installed; tests set ``huggingface_hub.constants.HF_HUB_DISABLE_XET`` to use the LFS protocol.

Usage::

    with FakeHub(token="hf_test") as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        ...
        assert hub.files("user/repo")["adapter_config.json"] == local_bytes
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
LFS_MIN_SIZE = 10 * 1024 * 1024
_REPO = r"(?P<repo>[^/]+/[^/]+)"


@dataclass
class Commit:
    """One commit the server accepted."""

    repo_id: str
    revision: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    """A repo: visibility and the file tree of each branch."""

    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})


class HubError(Exception):
    """An HTTP error answer (status, error code header, message)."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """In-memory Hub state plus the HTTP server in front of it.

    Args:
        token: The only token accepted in ``Authorization: Bearer ...``.
        user: Name returned by ``whoami``.
        fail_first: Answer 500 to this many requests first (transient outage).
        always_fail: Answer 500 to every request (the Hub is down).
    """

    def __init__(
        self, token: str, user: str = "cat-lover", fail_first: int = 0, always_fail: bool = False
    ) -> None:
        self.token, self.user = token, user
        self.fail_first, self.always_fail = fail_first, always_fail
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.lfs_paths: list[str] = []  # paths committed as LFS pointers
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.unexpected: list[tuple[str, str]] = []  # requests no route matched
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Return the file tree of a branch: path in repo -> content."""
        return dict(self.repos[repo_id].branches[revision])

    # --- routing --------------------------------------------------------------------------

    def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any]:
        """Answer one request: (status, JSON-serialisable body). Thread-safe."""
        with self._lock:
            if path == "/api/agent-harnesses":  # telemetry, not part of what tests count or break
                return 200, {"standardEnvVars": [], "harnesses": {}}
            self.requests.append((method, path))
            if self.always_fail or len(self.requests) <= self.fail_first:
                return 500, {"error": "Internal Server Error (simulated)"}
            for route_method, pattern, action in self._routes():
                match = re.fullmatch(pattern, path)
                if match and method == route_method:
                    return self._dispatch(action, match.groupdict(), headers, body)
            self.unexpected.append((method, path))
            return 404, {"error": f"No route for {method} {path}"}

    def _routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        return [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create_repo),
            ("GET", rf"/api/models/{_REPO}", self._repo_info),
            ("POST", rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)", self._create_branch),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", self._commit),
        ]

    def _dispatch(
        self,
        action: Callable[..., Any],
        params: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> tuple[int, Any]:
        # LFS PUTs go to storage with a pre-signed URL: the client sends no token there.
        if action != self._lfs_put and headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        try:
            return 200, action(body=body, **{k: unquote(v) for k, v in params.items()})
        except HubError as err:
            return err.status, {"error": err.message, "_code": err.code, **err.extra}

    # --- endpoints --------------------------------------------------------------------------

    def _whoami(self, body: bytes) -> dict[str, Any]:
        return {"type": "user", "name": self.user, "orgs": []}

    def _create_repo(self, body: bytes) -> dict[str, Any]:
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:  # the real Hub also sends the url with its 409
            raise HubError(409, "You already created this model repo", url=url)
        # huggingface_hub sends "visibility" from 1.8 on, "private" before (the Hub takes both).
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.repos[repo_id] = Repo(private=private)
        return {"url": url, "name": repo_id}

    def _repo_info(self, body: bytes, repo: str) -> dict[str, Any]:
        files = self._repo(repo).branches["main"]
        return {
            "id": repo,
            "private": self.repos[repo].private,
            "siblings": [{"rfilename": f} for f in files],
        }

    def _create_branch(self, body: bytes, repo: str, rev: str) -> dict[str, Any]:
        branches = self._repo(repo).branches
        if rev in branches:
            raise HubError(409, f"Reference {rev} already exists")
        branches[rev] = dict(branches["main"])
        return {}

    def _validate_yaml(self, body: bytes) -> dict[str, Any]:
        content = json.loads(body)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
        if match is None or not isinstance(yaml.safe_load(match.group(1)), dict):
            raise HubError(400, "README.md must start with a YAML metadata block")
        return {"errors": [], "warnings": []}

    def _preupload(self, body: bytes, repo: str, rev: str) -> dict[str, Any]:
        self._branch(repo, rev)
        files = json.loads(body)["files"]
        return {
            "files": [
                {"path": f["path"], "uploadMode": _upload_mode(f), "shouldIgnore": False}
                for f in files
            ]
        }

    def _lfs_batch(self, body: bytes, repo: str) -> dict[str, Any]:
        self._repo(repo)
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.blobs:  # no "actions" means "already stored"
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs/{obj['oid']}"}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def _lfs_put(self, body: bytes, oid: str) -> dict[str, Any]:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256 oid")
        self.blobs[oid] = body
        return {}

    def _commit(self, body: bytes, repo: str, rev: str) -> dict[str, Any]:
        tree = self._branch(repo, rev)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        message = next(line["value"]["summary"] for line in lines if line["key"] == "header")
        changes = dict(
            self._commit_line(line["key"], line["value"])
            for line in lines
            if line["key"] != "header"
        )
        for path, content in changes.items():
            if content is None:
                tree.pop(path, None)
            else:
                tree[path] = content
        self.commits.append(
            Commit(repo, rev, message, {p: c for p, c in changes.items() if c is not None})
        )
        oid = hashlib.sha1(body).hexdigest()
        return {
            "commitUrl": f"{self.url}/{repo}/commit/{oid}",
            "commitOid": oid,
            "pullRequestUrl": None,
        }

    def _commit_line(self, key: str, value: dict[str, Any]) -> tuple[str, bytes | None]:
        if key == "file":
            return value["path"], base64.b64decode(value["content"])
        if key == "lfsFile":
            if value["oid"] not in self.blobs:
                raise HubError(400, f"LFS object {value['oid']} was never uploaded")
            self.lfs_paths.append(value["path"])
            return value["path"], self.blobs[value["oid"]]
        if key == "deletedFile":
            return value["path"], None
        raise HubError(400, f"Unsupported commit operation {key!r}")

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return self.repos[repo_id]

    def _branch(self, repo_id: str, revision: str) -> dict[str, bytes]:
        branches = self._repo(repo_id).branches
        if revision not in branches:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return branches[revision]


def _upload_mode(file: dict[str, Any]) -> str:
    return (
        "lfs" if file["path"].endswith(LFS_SUFFIXES) or file["size"] >= LFS_MIN_SIZE else "regular"
    )


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1: huggingface_hub's client keeps connections alive; answers need Content-Length.
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def do_PUT(self) -> None:
            self._answer()

        def _answer(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload = hub.handle(
                self.command, urlsplit(self.path).path, headers, self._read_body()
            )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if isinstance(payload, dict) and payload.get("_code"):
                self.send_header("X-Error-Code", payload["_code"])
            self.end_headers()
            self.wfile.write(data)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return self._read_chunked()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _read_chunked(self) -> bytes:
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            self.rfile.readline()  # CRLF after the last (empty) chunk
            return b"".join(chunks)

        def log_message(self, format: str, *args: Any) -> None:
            """Keep test output quiet; `FakeHub.requests` records the traffic."""

    return Handler
