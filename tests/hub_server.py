"""A loopback HTTP server that speaks the subset of the Hugging Face hub API huggingface_hub uses
to download files: repo info at a revision, the file tree, HEAD and GET (with Range) of resolve
URLs with X-Repo-Commit / ETag / Content-Length, and the hub's error codes (X-Error-Code).

It records every request, so a test can assert which files were fetched and that an offline run
made none, and it can misbehave on purpose: cut a file's body short (`drop`), serve bytes that
differ from the listed hash (`corrupt`), or demand a token (`Repo.token`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""
    token: str | None = None  # when set, requests need "Authorization: Bearer <token>"

    def __post_init__(self):
        if not self.commit:
            digest = hashlib.sha1()
            for path in sorted(self.files):
                digest.update(path.encode() + b"\0" + self.files[path])
            self.commit = digest.hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_sha1(data)

    def tree_entry(self, path: str) -> dict:
        data = self.files[path]
        entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        if self.is_lfs(path):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def folders(self) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}


@dataclass
class Fault:
    after_bytes: int
    times: int  # how many more GETs of this file are cut short


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    drop: dict[str, Fault] = field(default_factory=dict)  # "repo_id/path" -> fault
    corrupt: set[str] = field(default_factory=set)  # "repo_id/path": one byte flipped in what is served

    def __post_init__(self):
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def downloads(self) -> list[str]:
        """Resolve-URL paths fetched with GET, as "repo_id/path", in order."""
        found = []
        for r in self.requests:
            match = _RESOLVE.match(r.path)
            if r.method == "GET" and match:
                found.append(f"{match['repo']}/{match['file']}")
        return found


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        # -- plumbing
        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict | None = None,
            head: bool = False,
            length: int | None = None,
        ):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str, head: bool, commit: str | None = None):
            headers = {"X-Error-Message": message, "Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, json.dumps({"error": message}).encode(), headers, head)

        def _repo(self, repo_id: str, head: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", head)
                return None
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must be authenticated to access it.",
                    head,
                )
                return None
            return repo

        def _revision_ok(self, repo: Repo, revision: str, head: bool) -> bool:
            if unquote(revision) in ("main", repo.commit):
                return True
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}", head)
            return False

        # -- routes
        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def _route(self, head: bool):
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub.log(
                Request("HEAD" if head else "GET", path, self.headers.get("Range"), self.headers.get("Authorization"))
            )
            if (m := _TREE.match(path)) is not None:
                return self._tree(m["repo"], m["rev"], m["path"] or "", parse_qs(url.query), head)
            if (m := _INFO.match(path)) is not None:
                return self._info(m["repo"], m["rev"] or "main", head)
            if (m := _RESOLVE.match(path)) is not None:
                return self._resolve(m["repo"], m["rev"], m["file"], head)
            self._error(404, None, "Not found", head)

        def _info(self, repo_id: str, revision: str, head: bool):
            repo = self._repo(repo_id, head)
            if repo is None or not self._revision_ok(repo, revision, head):
                return
            body = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "private": False,
                "siblings": [{"rfilename": p} for p in sorted(repo.files)],
            }
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

        def _tree(self, repo_id: str, revision: str, folder: str, query: dict, head: bool):
            repo = self._repo(repo_id, head)
            if repo is None or not self._revision_ok(repo, revision, head):
                return
            folder = folder.strip("/")
            if folder and folder not in repo.folders():
                return self._error(404, "EntryNotFound", f"{folder} does not exist on {revision}", head)
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            prefix = f"{folder}/" if folder else ""

            def inside(p: str) -> bool:
                return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

            entries = [
                {"type": "directory", "oid": "0" * 40, "size": 0, "path": d}
                for d in sorted(repo.folders())
                if inside(d)
            ]
            entries += [repo.tree_entry(p) for p in sorted(repo.files) if inside(p)]
            self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)

        def _resolve(self, repo_id: str, revision: str, file: str, head: bool):
            repo = self._repo(repo_id, head)
            if repo is None or not self._revision_ok(repo, revision, head):
                return
            if file not in repo.files:
                return self._error(404, "EntryNotFound", f"{file} does not exist", head, commit=repo.commit)
            data = repo.files[file]
            key = f"{repo_id}/{file}"
            if key in hub.corrupt:
                data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :]
            headers = {
                "X-Repo-Commit": repo.commit,
                "ETag": f'"{repo.etag(file)}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            if repo.is_lfs(file):
                headers["X-Linked-Etag"] = f'"{repo.etag(file)}"'
                headers["X-Linked-Size"] = str(len(repo.files[file]))
            start, status = 0, 200
            requested = self.headers.get("Range")
            if requested and not head:
                match = re.fullmatch(r"bytes=(\d+)-", requested.strip())
                if match:
                    start, status = int(match[1]), 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            fault = hub.drop.get(key)
            if head or fault is None or fault.times <= 0:
                return self._send(status, body, headers, head)
            # Promise the whole body, send part of it, then hang up.
            fault.times -= 1
            cut = max(0, fault.after_bytes - start) if start < fault.after_bytes else len(body) // 2
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True

    return Handler


def tiny_hub_repos(reference: Path, describers: dict[str, Path] | None = None) -> dict[str, Repo]:
    """The tiny PASD checkpoints and tiny SD base, laid out as the released hub repos, with files
    the manifests do not ask for (they must never be fetched). `describers` adds repos (repo id ->
    a folder built at test time, e.g. a tiny BLIP for Salesforce/blip-image-captioning-base)."""
    tiny = reference / "tiny-pasd"

    def read_tree(folder: Path, prefix: str) -> dict[str, bytes]:
        return {
            f"{prefix}{p.relative_to(folder).as_posix()}": p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    pasd = {
        **read_tree(tiny / "pasd" / "checkpoint-100000", "pasd/checkpoint-100000/"),
        **read_tree(tiny / "pasd_light" / "checkpoint-120000", "pasd_light/checkpoint-120000/"),
        "README.md": b"# PASD\n",
        "pasd/checkpoint-100000/scaler.pt": b"training state, never needed" * 100,
        "pasd/checkpoint-100000/optimizer.bin": b"\0" * 50_000,
    }
    sd15 = {
        **read_tree(tiny / "stable-diffusion-v1-5", ""),
        "README.md": b"# SD 1.5\n",
        "v1-5-pruned-emaonly.safetensors": b"\1" * 60_000,
    }
    repos = {"yangtao9009/PASD": Repo(pasd), "stable-diffusion-v1-5/stable-diffusion-v1-5": Repo(sd15)}
    for repo_id, folder in (describers or {}).items():
        repos[repo_id] = Repo(
            {
                **read_tree(folder, ""),
                "README.md": b"# model card\n",
                "pytorch_model.bin": b"pickled weights, never fetched" * 100,
            }
        )
    return repos


def clean_env(root: Path, hub: FakeHub | None = None, **extra) -> dict:
    """The user's environment minus any hub / pasd settings, with a private HF cache and store
    under `root`, pointed at `hub` when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "PASD_"))}
    env.update(HF_HOME=str(root / "hf-home"), PASD_HOME=str(root / "store"))
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    return {**env, **{k: str(v) for k, v in extra.items()}}
