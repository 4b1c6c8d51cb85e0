"""A loopback HTTP server that serves model repositories the way the Hugging Face hub does.

Only what ``huggingface_hub`` (``model_info``, ``list_repo_tree``, ``snapshot_download`` /
``hf_hub_download``) talks to:

* ``GET /api/models/{repo}[/revision/{rev}]``: repo info with ``sha`` (the commit) and ``siblings``;
* ``GET /api/models/{repo}/tree/{rev}``: the recursive file listing (path, size, git oid);
* ``HEAD /{repo}/resolve/{rev}/{file}``: metadata in ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length``;
* ``GET /{repo}/resolve/{rev}/{file}``: the bytes, honouring ``Range: bytes=N-`` with 206.

Unknown repos and revisions answer 404 with the hub's ``X-Error-Code`` (``RepoNotFound`` /
``RevisionNotFound``). To test resumption, :meth:`FakeHub.interrupt` makes the next full GET of a
file send only its first bytes and then either drop the connection or stall until
:meth:`FakeHub.release` (so a test can kill the client mid-download). Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["FakeHub", "Request"]

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    bytes_sent: int


@dataclass
class _Cut:
    at: int
    stall: bool
    released: threading.Event = field(default_factory=threading.Event)
    reached: threading.Event = field(default_factory=threading.Event)


class FakeHub:
    """``FakeHub({"acme/tiny": folder})`` serving on ``hub.url`` until :meth:`close`."""

    def __init__(self, repos: dict[str, Path], commit: str = "0123456789abcdef0123456789abcdef01234567") -> None:
        self.commit = commit
        self.repos: dict[str, dict[str, bytes]] = {
            repo: {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}
            for repo, root in repos.items()
        }
        self.requests: list[Request] = []
        self._cuts: dict[str, _Cut] = {}
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def interrupt(self, filename: str, at: int, *, stall: bool = False) -> threading.Event:
        """The next full GET of ``filename`` sends ``at`` bytes, then drops (or stalls).

        Returns an event set once those bytes have been sent.
        """
        cut = _Cut(at, stall)
        self._cuts[filename] = cut
        return cut.reached

    def release(self) -> None:
        """Let stalled responses end (their connection is then closed)."""
        for cut in self._cuts.values():
            cut.released.set()

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def gets(self, filename: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + filename)]

    # ---- handler ------------------------------------------------------------------------
    def _record(self, method: str, path: str, rng: str | None, sent: int) -> None:
        with self._lock:
            self.requests.append(Request(method, path, rng, sent))

    def _json(self, h: BaseHTTPRequestHandler, status: int, body: Any, error: str | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if error:
            h.send_header("X-Error-Code", error)
            h.send_header("X-Error-Message", body.get("error", error))
        h.end_headers()
        h.wfile.write(data)

    def _repo_rev(self, repo: str, rev: str) -> tuple[dict[str, bytes] | None, str | None]:
        files = self.repos.get(repo)
        if files is None:
            return None, "RepoNotFound"
        if rev not in ("main", self.commit):
            return None, "RevisionNotFound"
        return files, None

    def _serve(self, h: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        rng = h.headers.get("Range")
        method = "HEAD" if head else "GET"
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(/.*)?)?$", path)
        if m and not head:
            repo, kind, rev = m.group(1), m.group(2) or "revision", m.group(3) or "main"
            files, error = self._repo_rev(repo, rev)
            self._record(method, path, rng, 0)
            if files is None:
                return self._json(h, 404, {"error": f"{error}: {repo}@{rev}"}, error)
            if kind == "revision":
                return self._json(h, 200, {"id": repo, "modelId": repo, "sha": self.commit, "private": False,
                                           "siblings": [{"rfilename": f} for f in files]})
            return self._json(h, 200, [{"type": "file", "path": f, "size": len(b),
                                        "oid": hashlib.sha1(b).hexdigest()} for f, b in files.items()])
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if not m:
            self._record(method, path, rng, 0)
            return self._json(h, 404, {"error": "not found"}, "EntryNotFound")
        repo, rev, filename = m.groups()
        files, error = self._repo_rev(repo, rev)
        if files is None or filename not in files:
            self._record(method, path, rng, 0)
            error = error or "EntryNotFound"
            return self._json(h, 404, {"error": f"{error}: {repo}@{rev}/{filename}"}, error)
        data = files[filename]
        start, end = 0, len(data) - 1
        if rng and (r := _RANGE.match(rng)):
            start = int(r.group(1))
            end = int(r.group(2)) if r.group(2) else end
        body = data[start:end + 1]
        h.send_response(206 if rng else 200)
        h.send_header("X-Repo-Commit", self.commit)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(body)))
        if rng:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        if head:
            h.end_headers()
            return self._record(method, path, rng, 0)
        cut = self._cuts.get(filename)
        if cut is not None and not rng:
            del self._cuts[filename]
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(body[:cut.at])
            h.wfile.flush()
            self._record(method, path, rng, cut.at)
            cut.reached.set()
            if cut.stall:
                cut.released.wait(60)
            h.close_connection = True
            return None
        h.end_headers()
        h.wfile.write(body)
        self._record(method, path, rng, len(body))
        return None
