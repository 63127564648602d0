"""A tiny Hugging Face Hub look-alike on 127.0.0.1 for testing downloads offline.

Serves model repos from local directories with just the endpoints ``huggingface_hub`` 2.x calls for
``snapshot_download`` / ``hf_hub_download`` / ``HfApi.model_info``:

- ``GET /api/models/<repo>[/revision/<rev>]``  repo info (``sha``, ``siblings``)
- ``GET /api/models/<repo>/tree/<rev>[/<path>]``  file listing (one page, no ``Link`` header)
- ``HEAD|GET /<repo>/resolve/<rev>/<file>``  file metadata (``X-Repo-Commit``, ``ETag``) and content

Unknown repos answer 404 with ``X-Error-Code: RepoNotFound``, unknown revisions ``RevisionNotFound``, unknown
files ``EntryNotFound`` (what the real hub sends, so the client raises its usual errors). Every request is
recorded in ``requests``. Use as a context manager: it binds 127.0.0.1 on a free port, serves from a daemon
thread, and shuts down on exit.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path


class _Repo:
    def __init__(self, directory: Path, revisions: tuple[str, ...]):
        self.files = {
            p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
        }
        digest = hashlib.sha1(b"".join(name.encode() + data for name, data in self.files.items())).hexdigest()
        self.sha = digest
        self.revisions = set(revisions) | {digest}


class HubServer:
    """Serve ``{repo_id: directory}`` as hub model repos at ``self.endpoint`` (set it as ``HF_ENDPOINT``)."""

    def __init__(self, repos: dict[str, str | Path], revisions: tuple[str, ...] = ("main",), timeout: float = 10.0):
        self.repos = {repo_id: _Repo(Path(d), revisions) for repo_id, d in repos.items()}
        self.requests: list[tuple[str, str]] = []
        self._timeout = timeout
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``."""
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def paths(self, method: str | None = None) -> list[str]:
        """Request paths seen so far (optionally only those of one HTTP method)."""
        return [path for m, path in self.requests if method is None or m == method]

    def __enter__(self) -> "HubServer":
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = hub._timeout  # a stalled client cannot hold a handler thread forever

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub._handle(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._handle(self, body=True)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------------------------------ routing

    def _find_repo(self, parts: list[str]) -> tuple[str, _Repo, list[str]] | None:
        if len(parts) >= 2 and "/".join(parts[:2]) in self.repos:
            return "/".join(parts[:2]), self.repos["/".join(parts[:2])], parts[2:]
        if parts and parts[0] in self.repos:
            return parts[0], self.repos[parts[0]], parts[1:]
        return None

    def _handle(self, handler: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        url = urllib.parse.urlsplit(handler.path)
        self.requests.append((handler.command, url.path))
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/") if p]
        if parts[:2] == ["api", "models"]:
            found = self._find_repo(parts[2:])
            if found is None:
                return self._error(handler, 404, "RepoNotFound")
            repo_id, repo, rest = found
            if not rest:
                rest = ["revision", "main"]
            if rest[0] == "revision" and len(rest) == 2:
                if rest[1] not in repo.revisions:
                    return self._error(handler, 404, "RevisionNotFound")
                info = {
                    "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                    "siblings": [{"rfilename": name} for name in repo.files],
                }
                return self._send(handler, 200, json.dumps(info).encode(), "application/json", body)
            if rest[0] == "tree" and len(rest) >= 2:
                if rest[1] not in repo.revisions:
                    return self._error(handler, 404, "RevisionNotFound")
                prefix = "/".join(rest[2:])
                listing = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in repo.files.items() if name.startswith(prefix)
                ]
                return self._send(handler, 200, json.dumps(listing).encode(), "application/json", body)
            return self._error(handler, 404, "EntryNotFound")
        found = self._find_repo(parts)
        if found is None:
            return self._error(handler, 404, "RepoNotFound")
        _, repo, rest = found
        if len(rest) < 3 or rest[0] != "resolve":
            return self._error(handler, 404, "EntryNotFound")
        if rest[1] not in repo.revisions:
            return self._error(handler, 404, "RevisionNotFound")
        data = repo.files.get("/".join(rest[2:]))
        if data is None:
            return self._error(handler, 404, "EntryNotFound")
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        return self._send(handler, 200, data, "application/octet-stream", body, headers)

    @staticmethod
    def _send(handler, status: int, data: bytes, content_type: str, body: bool, headers: dict | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def _error(self, handler, status: int, code: str) -> None:
        self._send(handler, status, json.dumps({"error": code}).encode(), "application/json",
                   handler.command != "HEAD", {"X-Error-Code": code, "X-Error-Message": code})
