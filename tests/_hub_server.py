"""A hub on loopback for `motionsep download` tests: a real HTTP server, no mocks.

``FakeHub`` answers the endpoints huggingface_hub calls (revision, tree,
HEAD/GET resolve with Range) from in-memory ``Repo`` objects;
``running_hub`` starts one and lets huggingface_hub talk to it for one test
(see tests/test_hub.py for why the offline switch is flipped that way).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from motionsep.store import MODEL_RECORD

# -- the server ------------------------------------------------------------


@dataclass
class Repo:
    """One repository: its files, its commit, optionally a token it requires."""

    files: dict[str, bytes]
    sha: str = ""
    token: str | None = None
    # Listed in the tree but answered with 404 EntryNotFound.
    unserved: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + hashlib.sha1(self.files[path]).digest())
        self.sha = self.sha or digest.hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin"))


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The part of the hub's HTTP API that huggingface_hub downloads use."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.gets: Counter[str] = Counter()
        self.waits: list[float] = []  # the client's retry waits, in seconds
        self.ranges: list[tuple[str, str]] = []
        # path -> byte offset where the body is cut; "once" cuts only the next GET.
        self.cut_at: dict[str, int] = {}
        self.cut_once: set[str] = set()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and Range, as the real hub

            def setup(self) -> None:
                super().setup()
                with hub._lock:
                    hub._connections.add(self.connection)

            def log_message(self, format: str, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                hub._handle(self, head=False)

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        """Stops listening and closes the open keep-alive connections too."""
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()

    # -- request handling -----------------------------------------------------

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def _error(self, handler: BaseHTTPRequestHandler, status: int, code: str, head: bool) -> None:
        body = json.dumps({"error": code}).encode()
        headers = {
            "X-Error-Code": code,
            "X-Error-Message": code,
            "Content-Type": "application/json",
        }
        self._send(handler, status, body, headers, head)

    def _json(self, handler: BaseHTTPRequestHandler, data: object) -> None:
        self._send(handler, 200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _handle(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(handler.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        repo_id = "/".join(parts[2:4] if api else parts[0:2])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(handler, 404, "RepoNotFound", head)
        if repo.token and handler.headers.get("authorization") != f"Bearer {repo.token}":
            return self._error(handler, 401, "GatedRepo", head)
        if api:
            rest = parts[4:]
            revision = rest[1] if len(rest) >= 2 else "main"
            if revision not in ("main", repo.sha):
                return self._error(handler, 404, "RevisionNotFound", head)
            if not rest or rest[0] == "revision":
                siblings = [{"rfilename": p, "size": len(d)} for p, d in sorted(repo.files.items())]
                return self._json(handler, {"id": repo_id, "sha": repo.sha, "siblings": siblings})
            if rest[0] == "tree":
                return self._json(
                    handler, [self._tree_entry(p, d) for p, d in sorted(repo.files.items())]
                )
            return self._error(handler, 404, "NotFound", head)
        # /{repo}/resolve/{revision}/{path}
        revision, path = parts[3], "/".join(parts[4:])
        if revision not in ("main", repo.sha):
            return self._error(handler, 404, "RevisionNotFound", head)
        if path not in repo.files or path in repo.unserved:
            return self._error(handler, 404, "EntryNotFound", head)
        self._serve_file(handler, repo, path, head)

    @staticmethod
    def _tree_entry(path: str, data: bytes) -> dict[str, object]:
        entry: dict[str, object] = {
            "type": "file",
            "path": path,
            "size": len(data),
            "oid": _git_blob_id(data),
        }
        if _is_lfs(path):
            entry["lfs"] = {
                "oid": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "pointerSize": 134,
            }
        return entry

    def _serve_file(
        self, handler: BaseHTTPRequestHandler, repo: Repo, path: str, head: bool
    ) -> None:
        data = repo.files[path]
        etag = hashlib.sha256(data).hexdigest() if _is_lfs(path) else _git_blob_id(data)
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if _is_lfs(path):
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        if head:
            headers["Content-Length"] = str(len(data))
            return self._send(handler, 200, b"", headers, head=True)
        with self._lock:
            self.gets[path] += 1
        start, status = 0, 200
        range_header = handler.headers.get("Range")
        if range_header:
            with self._lock:
                self.ranges.append((path, range_header))
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        with self._lock:
            cut = self.cut_at.get(path)
            if path in self.cut_once:
                self.cut_once.discard(path)
                self.cut_at.pop(path, None)
        if cut is None:
            return self._send(handler, status, body, headers)
        # Promise the whole body, send part of it, and hang up: a cut download.
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: max(0, cut - start)])
        handler.wfile.flush()
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file of a model folder but its store record, as a repository's contents."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MODEL_RECORD
    }


@contextlib.contextmanager
def running_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running loopback hub; huggingface_hub may talk to it until the block ends."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Small chunks, so that a cut body leaves complete chunks to resume from.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub waits 1 s before each retry of a cut body (5 tries): the
    # waits are recorded, not slept, so a test of giving up costs no idle seconds.
    from huggingface_hub import file_download

    server = FakeHub()
    monkeypatch.setattr(
        file_download,
        "time",
        types.SimpleNamespace(**{**vars(time), "sleep": server.waits.append}),
    )
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    try:
        yield server
    finally:
        server.stop()


def store_entries(home: Path) -> list[str]:
    """What the store's models/ folder holds (finished models and partial downloads)."""
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []
