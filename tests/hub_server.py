"""A small local Hub: the part of the Hugging Face Hub HTTP API that ``huggingface_hub`` (2.x) uses to create a
repo and branch and to commit files, so ``push`` is tested against the real client code.

Endpoints (as ``huggingface_hub/hf_api.py``, ``_commit_api.py``, ``lfs.py`` and ``_upload_pipeline.py`` call them):

* ``POST /api/repos/create`` (``HfApi.create_repo``): 409 when it exists (``exist_ok`` accepts that);
* ``GET /api/models/{repo}[/revision/{rev}]`` (``repo_info``);
* ``POST /api/models/{repo}/branch/{branch}`` (``create_branch``);
* ``POST /api/validate-yaml`` (``upload_folder`` validates README.md's metadata before uploading);
* ``POST /api/models/{repo}/preupload/{rev}`` (``_fetch_upload_modes``): ``uploadMode`` is ``lfs`` for names
  ending in ``lfs_suffixes`` and ``regular`` otherwise. With ``hf_xet`` installed, ``upload_folder`` sends
  ``lfs`` files through Xet storage, which this server does not speak: tests that want large files disable
  Xet (``HF_HUB_DISABLE_XET``) so that the LFS path below runs;
* ``POST /{repo}.git/info/lfs/objects/batch`` (``lfs.post_lfs_batch_info``), ``PUT /lfs-upload/{oid}``
  (basic transfer, no Hub token, like a presigned S3 URL) and ``POST /lfs-verify``;
* ``POST /api/models/{repo}/commit/{rev}`` (``_send_commit``): NDJSON, regular files inline in base64, LFS
  files by sha256.

Every call but the LFS PUT needs ``Authorization: Bearer <token>``; a wrong token gets 401. The server binds
127.0.0.1 on an ephemeral port, runs in a daemon thread, reads exactly the bytes a request announces, and
stops answering (503) after ``max_requests`` requests, so a client loop cannot spin forever.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class HubState:
    token: str
    lfs_suffixes: tuple[str, ...] = ()
    max_requests: int = 500
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # oid -> bytes received by PUT
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    lock: threading.Lock = field(default_factory=threading.Lock)


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_REV = r"(?P<rev>[^/?]+)"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds a socket may stay idle
    server: _Server

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, code: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.server.state.token}"

    def _dispatch(self, method: str) -> None:
        st = self.server.state
        path = self.path.split("?", 1)[0]
        with st.lock:
            st.requests.append((method, path))
            over = len(st.requests) > st.max_requests
        body = self._body()
        if over:
            return self._send(503, {"error": "request budget exhausted"})
        for m, pattern, fn in _ROUTES:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                if fn is not _lfs_put and not self._authorized():
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                return fn(self, body, **match.groupdict())
        return self._send(404, {"error": f"no route {method} {path}"})

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def repo(self, repo: str) -> Repo | None:
        return self.server.state.repos.get(repo)

    def not_found(self, what: str, code: str) -> None:
        self._send(404, {"error": f"{what} not found"}, {"X-Error-Code": code})


# ---------------------------------------------------------------------- endpoints


def _create(h: _Handler, body: bytes) -> None:
    req = json.loads(body)
    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else f"user/{req['name']}"
    st = h.server.state
    with st.lock:
        if repo_id in st.repos:
            return h._send(409, {"error": "You already created this model repo", "url": f"{h.base_url}/{repo_id}"})
        st.repos[repo_id] = Repo(private=req.get("visibility") == "private")
    h._send(200, {"url": f"{h.base_url}/{repo_id}", "name": repo_id, "id": repo_id})


def _info(h: _Handler, body: bytes, repo: str, rev: str = "main") -> None:
    r = h.repo(repo)
    if r is None:
        return h.not_found("Repository", "RepoNotFound")
    if rev not in r.branches:
        return h.not_found("Revision", "RevisionNotFound")
    sha = r.commits[-1]["oid"] if r.commits else "0" * 40
    h._send(200, {"id": repo, "modelId": repo, "sha": sha, "private": r.private, "siblings": []})


def _branch(h: _Handler, body: bytes, repo: str, rev: str) -> None:
    r = h.repo(repo)
    if r is None:
        return h.not_found("Repository", "RepoNotFound")
    if rev in r.branches:
        return h._send(409, {"error": "Reference already exists"})
    r.branches[rev] = dict(r.branches["main"])
    h._send(200, {})


def _validate_yaml(h: _Handler, body: bytes) -> None:
    h._send(200, {"errors": [], "warnings": []})


def _preupload(h: _Handler, body: bytes, repo: str, rev: str) -> None:
    r = h.repo(repo)
    if r is None:
        return h.not_found("Repository", "RepoNotFound")
    if rev not in r.branches:
        return h.not_found("Revision", "RevisionNotFound")
    files = json.loads(body)["files"]
    out = [
        {
            "path": f["path"],
            "uploadMode": "lfs" if f["path"].endswith(h.server.state.lfs_suffixes) else "regular",
            "shouldIgnore": False,
            "oid": None,
        }
        for f in files
    ]
    h._send(200, {"files": out, "commitOid": None})


def _lfs_batch(h: _Handler, body: bytes, repo: str) -> None:
    req = json.loads(body)
    objects = [
        {
            "oid": o["oid"],
            "size": o["size"],
            "authenticated": True,
            "actions": {
                "upload": {"href": f"{h.base_url}/lfs-upload/{o['oid']}"},
                "verify": {"href": f"{h.base_url}/lfs-verify"},
            },
        }
        for o in req["objects"]
    ]
    h._send(200, {"transfer": "basic", "objects": objects})


def _lfs_put(h: _Handler, body: bytes, oid: str) -> None:
    if hashlib.sha256(body).hexdigest() != oid:
        return h._send(400, {"error": "sha256 mismatch"})
    with h.server.state.lock:
        h.server.state.lfs[oid] = body
    h._send(200, {})


def _lfs_verify(h: _Handler, body: bytes) -> None:
    req = json.loads(body)
    got = h.server.state.lfs.get(req["oid"])
    if got is None or len(got) != req["size"]:
        return h._send(404, {"error": "object not uploaded"})
    h._send(200, {})


def _commit(h: _Handler, body: bytes, repo: str, rev: str) -> None:
    r = h.repo(repo)
    if r is None:
        return h.not_found("Repository", "RepoNotFound")
    if rev not in r.branches:
        return h.not_found("Revision", "RevisionNotFound")
    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
    files: dict[str, bytes] = {}
    for item in lines[1:]:
        v = item["value"]
        if item["key"] == "file":
            files[v["path"]] = base64.b64decode(v["content"])
        elif item["key"] == "lfsFile":
            data = h.server.state.lfs.get(v["oid"])
            if data is None:
                return h._send(422, {"error": f"LFS object {v['oid']} was never uploaded"})
            files[v["path"]] = data
        else:
            return h._send(400, {"error": f"unsupported commit operation {item['key']}"})
    oid = hashlib.sha1(body).hexdigest()
    r.branches[rev].update(files)
    r.commits.append({"oid": oid, "branch": rev, "summary": lines[0]["value"]["summary"], "files": sorted(files)})
    h._send(200, {"commitUrl": f"{h.base_url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})


_ROUTES = [
    ("POST", r"/api/repos/create", _create),
    ("POST", r"/api/validate-yaml", _validate_yaml),
    ("GET", rf"/api/models/{_REPO}", _info),
    ("GET", rf"/api/models/{_REPO}/revision/{_REV}", _info),
    ("POST", rf"/api/models/{_REPO}/branch/{_REV}", _branch),
    ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", _preupload),
    ("POST", rf"/api/models/{_REPO}/commit/{_REV}", _commit),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _lfs_batch),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", _lfs_put),
    ("POST", r"/lfs-verify", _lfs_verify),
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class LocalHub:
    """Run a local Hub for a ``with`` block: ``with LocalHub(token) as hub: ... hub.url``."""

    def __init__(self, token: str, lfs_suffixes: tuple[str, ...] = (), max_requests: int = 500):
        self.state = HubState(token, lfs_suffixes, max_requests)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.state.repos[repo_id].branches[branch])

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
