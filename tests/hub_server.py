"""A local stand-in of the Hugging Face Hub's HTTP API, for tests that push and pull adapters for real.

It serves what `huggingface_hub` requests for `HfApi.create_repo`, `HfApi.upload_folder` (preupload, the git-LFS
batch API with basic transfer and verify, the NDJSON commit), `HfApi.repo_info`, `HfApi.list_repo_tree` (what `snapshot_download` lists), and `hf_hub_download` (HEAD/GET
`resolve` with `X-Repo-Commit`, `ETag`, and for LFS files a 302 to a separate "CDN" origin with `X-Linked-Etag` and
`X-Linked-Size`), with the Hub's error headers (`X-Error-Code`). Blobs are stored by sha256 under a directory.

Modelled on the Hub: writes need `Authorization: Bearer <token>`; a new repo starts with a `.gitattributes`
commit; files matching `lfs_patterns` (the Hub's default `.gitattributes` has `*.safetensors`) or over 10 MB are
uploaded through LFS, the rest as base64 in the commit; README front matter must be YAML whose `base_model` names a
model repo on this hub. Not reproduced: Xet storage (run clients with `HF_HUB_DISABLE_XET=1`, or pass
`lfs_patterns=()` so every file goes in the commit), pull requests, branches other than `main`, spaces, datasets.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BASE_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    sha256: str
    size: int
    lfs: bool
    git_oid: str  # git blob sha1 of the content (regular files) or of the LFS pointer (LFS files)


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Optional[Commit]:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


@dataclass
class LoggedRequest:
    origin: str  # "hub" or "cdn"
    method: str
    path: str
    authorized: bool


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None,
                 body: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {"error": message}


class HubStandIn:
    """Start with `with HubStandIn(directory) as hub:`; point clients at `hub.endpoint` with `hub.token`."""

    def __init__(self, directory: Path, token: str = "hf_standin_token",
                 lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS) -> None:
        self.directory = Path(directory)
        self.objects = self.directory / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.lfs_patterns = tuple(lfs_patterns)
        self.repos: dict[str, Repo] = {}
        self.requests: list[LoggedRequest] = []
        self.lock = threading.RLock()
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, origin)) for origin in ("hub", "cdn")]
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        self._threads: list[threading.Thread] = []

    # --- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> "HubStandIn":
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: Any) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    # --- what tests inspect ------------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file of a repo at a revision, as the bytes the server stored."""
        with self.lock:
            commit = self.repos[repo_id].at(revision)
            return {path: self.read_object(f.sha256) for path, f in commit.files.items()}

    def stored(self, repo_id: str, path: str) -> StoredFile:
        with self.lock:
            return self.repos[repo_id].head.files[path]

    def commits(self, repo_id: str) -> list[Commit]:
        with self.lock:
            return list(self.repos[repo_id].commits)

    def read_object(self, sha256: str) -> bytes:
        return (self.objects / sha256).read_bytes()

    # --- storage -----------------------------------------------------------------------------------------

    def store_object(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.objects / digest
        if not target.exists():
            tmp = target.with_suffix(".partial")
            tmp.write_bytes(data)
            tmp.replace(target)
        return digest

    def has_object(self, sha256: str, size: Optional[int] = None) -> bool:
        path = self.objects / sha256
        return path.exists() and (size is None or path.stat().st_size == size)

    def is_lfs(self, path: str, size: int) -> bool:
        return size > LFS_SIZE_THRESHOLD or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in self.lfs_patterns)

    def regular_file(self, data: bytes) -> StoredFile:
        return StoredFile(self.store_object(data), len(data), False, git_blob_sha1(data))

    @staticmethod
    def lfs_pointer(sha256: str, size: int) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()

    def lfs_file(self, sha256: str, size: int) -> StoredFile:
        return StoredFile(sha256, size, True, git_blob_sha1(self.lfs_pointer(sha256, size)))

    def new_commit(self, repo: Repo, message: str, files: dict[str, StoredFile]) -> Commit:
        parent = repo.head.oid if repo.commits else ""
        listing = json.dumps({p: f.git_oid for p, f in sorted(files.items())})
        oid = hashlib.sha1(f"{parent}\n{message}\n{listing}\n{time.time_ns()}".encode()).hexdigest()
        commit = Commit(oid, message, dict(files))
        repo.commits.append(commit)
        return commit

    def gitattributes(self) -> bytes:
        return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in self.lfs_patterns).encode()

    # --- API ---------------------------------------------------------------------------------------------

    def repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def create_repo(self, body: dict) -> dict:
        if body.get("type", "model") != "model":
            raise HubError(400, "This stand-in hosts model repos only")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if not REPO_ID.match(repo_id):
            raise HubError(400, f"Invalid repo id {repo_id!r}: expected namespace/name")
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", body={"error": "You already created this model repo", "url": url})
        repo = Repo(repo_id, private=bool(body.get("private")))
        self.new_commit(repo, "initial commit", {".gitattributes": self.regular_file(self.gitattributes())})
        self.repos[repo_id] = repo
        return {"url": url, "name": repo_id, "id": repo_id}

    def validate_yaml(self, body: dict) -> dict:
        content = body.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if match is None:
            return {"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            raise HubError(400, "Invalid YAML", body={"errors": [{"message": f"YAML error: {e}"}]})
        if not isinstance(metadata, dict):
            raise HubError(400, "Invalid YAML", body={"errors": [{"message": "metadata must be a YAML mapping"}]})
        base = metadata.get("base_model")
        bases = base if isinstance(base, list) else [] if base is None else [base]
        bad = [b for b in bases if not (isinstance(b, str) and BASE_MODEL_ID.match(b) and b in self.repos)]
        if bad:
            errors = [{"message": f'"base_model" with value {b!r} is not valid. Use a model id from {self.endpoint}/models.'}
                      for b in bad]
            raise HubError(400, "Invalid metadata", body={"errors": errors})
        return {"errors": [], "warnings": []}

    def preupload(self, repo: Repo, revision: str, body: dict) -> dict:
        commit = self.commit_at(repo, revision)
        out = []
        for item in body["files"]:
            path, size = item["path"], int(item["size"])
            lfs = self.is_lfs(path, size) and size > 0
            remote = commit.files.get(path)
            oid = None if remote is None else (remote.sha256 if remote.lfs else remote.git_oid)
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return {"files": out, "commitOid": commit.oid}

    def lfs_batch(self, repo: Repo, body: dict) -> dict:
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "Only the upload operation with the basic transfer is supported")
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.has_object(oid, size):
                entry["actions"] = {
                    "upload": {"href": f"{self.cdn}/upload/{oid}?size={size}", "header": {}},
                    "verify": {"href": f"{self.endpoint}/{repo.repo_id}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def lfs_verify(self, body: dict) -> dict:
        if not self.has_object(body["oid"], int(body["size"])):
            raise HubError(404, f"LFS object {body['oid']} of size {body['size']} was not uploaded")
        return {"oid": body["oid"], "size": body["size"]}

    def cdn_upload(self, oid: str, size: int, data: bytes) -> None:
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
        self.store_object(data)

    def commit(self, repo: Repo, revision: str, ndjson: bytes) -> dict:
        if revision != "main":
            raise HubError(400, "This stand-in commits to main only")
        lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, repo.head.oid):
            raise HubError(412, f"Parent commit {header['parentCommit']} is not the head of main {repo.head.oid}")
        files = dict(repo.head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"{path}: unsupported encoding {value.get('encoding')!r}")
                files[path] = self.regular_file(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                if not self.has_object(value["oid"], value.get("size")):
                    raise HubError(422, f"{path}: LFS object {value['oid']} was never uploaded")
                size = (self.objects / value["oid"]).stat().st_size
                files[path] = self.lfs_file(value["oid"], size)
            elif key == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        commit = self.new_commit(repo, header.get("summary", ""), files)
        return {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None}

    def commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.at(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def tree(self, repo: Repo, revision: str, folder: str, recursive: bool) -> list[dict]:
        commit = self.commit_at(repo, revision)
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries, folders = [], set()
        for path, f in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            entry = {"type": "file", "path": path, "size": f.size, "oid": f.git_oid}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(self.lfs_pointer(f.sha256, f.size))}
            entries.append(entry)
        if prefix and not entries and not folders:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        return [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(folders)] + entries

    def repo_info(self, repo: Repo, revision: str) -> dict:
        commit = self.commit_at(repo, revision)
        return {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid, "private": repo.private,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)], "tags": []}


def _handler(hub: HubStandIn, origin: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            self.dispatch("GET")

        def do_HEAD(self) -> None:
            self.dispatch("HEAD")

        def do_POST(self) -> None:
            self.dispatch("POST")

        def do_PUT(self) -> None:
            self.dispatch("PUT")

        # --- plumbing ----------------------------------------------------------------------------------

        def body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def json_body(self) -> dict:
            return json.loads(self.body() or b"{}")

        @property
        def authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def require_auth(self) -> None:
            if not self.authorized:
                raise HubError(401, "Invalid credentials in Authorization header")

        def send(self, status: int, body: bytes = b"", headers: Optional[dict] = None,
                 content_type: str = "application/json", method: str = "GET") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)

        def dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            with hub.lock:
                hub.requests.append(LoggedRequest(origin, method, path, "Authorization" in self.headers))
            try:
                if method in ("POST", "PUT"):
                    payload = self.body()  # read before answering, whatever the answer
                else:
                    payload = b""
                with hub.lock:
                    result = self.route(method, path, query, payload)
                if result is not None:
                    status, body, headers, content_type = result
                    self.send(status, body, headers, content_type, method)
            except HubError as e:
                headers = {"X-Error-Message": e.message, **e.headers}
                if e.code:
                    headers["X-Error-Code"] = e.code
                self.send(e.status, json.dumps(e.body).encode(), headers, method=method)

        def route(self, method: str, path: str, query: dict, payload: bytes):
            ok = lambda obj: (200, json.dumps(obj).encode(), {}, "application/json")  # noqa: E731
            if origin == "cdn":
                if method == "PUT" and path.startswith("/upload/"):
                    hub.cdn_upload(path.rsplit("/", 1)[1], int(query["size"][0]), payload)
                    return 200, b"", {"ETag": '"' + path.rsplit("/", 1)[1] + '"'}, "text/plain"
                if method in ("GET", "HEAD") and path.startswith("/lfs/"):
                    oid = path.rsplit("/", 1)[1]
                    if not hub.has_object(oid):
                        raise HubError(404, "No such object")
                    return 200, hub.read_object(oid), {"ETag": f'"{oid}"'}, "application/octet-stream"
                raise HubError(404, f"Not found: {path}")

            parts = path.strip("/").split("/")
            if method == "POST" and path == "/api/repos/create":
                self.require_auth()
                return ok(hub.create_repo(json.loads(payload)))
            if method == "POST" and path == "/api/validate-yaml":
                return ok(hub.validate_yaml(json.loads(payload)))
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo = hub.repo("/".join(parts[2:4]), self.authorized)
                rest = parts[4:]
                if method == "GET" and not rest:
                    return ok(hub.repo_info(repo, "main"))
                if method == "GET" and rest[:1] == ["revision"]:
                    return ok(hub.repo_info(repo, "/".join(rest[1:])))
                if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                    recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                    return ok(hub.tree(repo, rest[1], "/".join(rest[2:]), recursive))
                if method == "POST" and rest[:1] == ["preupload"]:
                    self.require_auth()
                    return ok(hub.preupload(repo, "/".join(rest[1:]), json.loads(payload)))
                if method == "POST" and rest[:1] == ["commit"]:
                    self.require_auth()
                    return ok(hub.commit(repo, "/".join(rest[1:]), payload))
            if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                self.require_auth()
                return ok(hub.lfs_batch(hub.repo(f"{parts[0]}/{parts[1][:-4]}", True), json.loads(payload)))
            if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "verify"]:
                self.require_auth()
                return ok(hub.lfs_verify(json.loads(payload)))
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self.resolve(hub.repo("/".join(parts[:2]), self.authorized), parts[3], "/".join(parts[4:]))
            raise HubError(404, f"Not found: {method} {path}")

        def resolve(self, repo: Repo, revision: str, filename: str):
            commit = hub.commit_at(repo, revision)
            headers = {"X-Repo-Commit": commit.oid}
            stored = commit.files.get(filename)
            if stored is None:
                raise HubError(404, f"Entry not found: {filename}", "EntryNotFound", headers)
            headers["ETag"] = f'"{stored.git_oid}"'
            if stored.lfs:  # like the Hub: a redirect to the CDN, the file's metadata on the redirect itself
                headers.update({"Location": f"{hub.cdn}/lfs/{stored.sha256}", "X-Linked-Etag": f'"{stored.sha256}"',
                                "X-Linked-Size": str(stored.size)})
                return 302, b"", headers, "text/plain"
            return 200, hub.read_object(stored.sha256), headers, "application/octet-stream"

    return Handler
