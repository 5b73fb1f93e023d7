"""A local Hugging Face Hub for tests: a real HTTP server on 127.0.0.1, standard library only, in memory.

It speaks the part of the Hub's HTTP API that huggingface_hub 2.4 uses to push and download a model with Xet off
(``HF_HUB_DISABLE_XET=1``): ``whoami-v2``, ``repos/create``, ``validate-yaml``, ``preupload``, the LFS batch / upload
/ verify flow, the NDJSON ``commit``, ``model_info``, the ``tree`` listing and ``resolve`` (HEAD and GET, with the
ETag, X-Repo-Commit, X-Linked-Etag and X-Linked-Size headers that ``hf_hub_download`` checks).

Tests can make an endpoint fail (:meth:`FakeHub.fail`) and read what was asked (:attr:`FakeHub.requests`) and which
Authorization headers arrived (:attr:`FakeHub.authorizations`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
# What the Hub's default .gitattributes sends through LFS, plus any binary file (a NUL byte in the first 512 bytes).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".png", ".model", ".h5", ".msgpack", ".onnx")
GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    content: bytes
    lfs_sha256: str | None = None  # set for files committed through LFS

    @property
    def git_oid(self) -> str:
        pointer = lfs_pointer(self.lfs_sha256, len(self.content)) if self.lfs_sha256 else self.content
        return git_blob_oid(pointer)


@dataclass
class Repo:
    owner: str
    private: bool
    commits: list[tuple[str, dict[str, StoredFile]]] = field(default_factory=list)  # (oid, files), oldest first

    @property
    def head(self) -> tuple[str, dict[str, StoredFile]]:
        return self.commits[-1]

    def at(self, revision: str) -> tuple[str, dict[str, StoredFile]] | None:
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c[0] == revision), None)

    def commit(self, files: dict[str, StoredFile], message: str) -> str:
        parent = self.commits[-1][0] if self.commits else ""
        digest = hashlib.sha1(f"{parent}\n{message}\n".encode())
        for path in sorted(files):
            digest.update(f"{path} {files[path].git_oid}\n".encode())
        oid = digest.hexdigest()
        self.commits.append((oid, files))
        return oid


@dataclass
class Failure:
    method: str | None
    pattern: str
    status: int
    message: str
    times: int | None  # None: every time


class FakeHub:
    """In-memory Hub state plus the HTTP server that serves it. Use as a context manager or call start/stop."""

    def __init__(self, users: dict[str, str] | None = None):
        self.users = dict(users or {})  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, after a verified upload
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.authorizations: list[str] = []  # every Authorization header received
        self.lfs_uploads: list[str] = []  # sha256 of every LFS PUT
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_HubHandler):
            state = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True, name="fake-hub").start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    # --- test helpers ---------------------------------------------------------------------------------------------
    def fail(self, pattern: str, status: int, message: str = "Injected failure", *, method: str | None = None,
             times: int | None = None) -> None:
        """Answer requests whose path matches ``pattern`` (regex) with ``status`` and a Hub-style JSON error."""
        self.failures.append(Failure(method, pattern, status, message, times))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        _, files = self.repos[repo_id].at(revision)
        return {path: stored.content for path, stored in files.items()}


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length
    state: FakeHub

    def log_message(self, *args) -> None:  # quiet: tests read FakeHub.requests instead
        pass

    # --- plumbing -------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._json(status, {"error": message}, extra)

    def _user(self) -> tuple[str | None, bool]:
        """(user, bad_token): no header gives (None, False); an unknown token gives (None, True)."""
        header = self.headers.get("Authorization")
        if header is None:
            return None, False
        with self.state.lock:
            self.state.authorizations.append(header)
        token = header.removeprefix("Bearer ").strip()
        user = self.state.users.get(token)
        return user, user is None

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        body = self._body() if self.command in ("POST", "PUT") else b""
        hub = self.state
        with hub.lock:
            hub.requests.append((self.command, path))
            failure = next((f for f in hub.failures if (f.method in (None, self.command))
                            and re.search(f.pattern, path) and f.times != 0), None)
            if failure is not None and failure.times is not None:
                failure.times -= 1
        if failure is not None:
            return self._error(failure.status, failure.message)
        for method, pattern, handler in ROUTES:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                return handler(self, body=body, query=query, **match.groupdict())
        if self.command == "HEAD" or self.command == "GET":
            match = re.fullmatch(rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", path)
            if match:
                return self.resolve(**match.groupdict())
        self._error(404, f"No route for {self.command} {path}")

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    def _writable_repo(self, repo_id: str) -> Repo | None:
        user, bad = self._user()
        repo = self.state.repos.get(repo_id)
        if bad or user is None:
            self._error(401, "Invalid credentials in Authorization header")
        elif repo is None:
            self._error(404, f"Repository {repo_id} not found", code="RepoNotFound")
        elif repo.owner != user:
            self._error(403, f"You don't have the rights to write to {repo_id}")
        else:
            return repo
        return None

    def _readable_repo(self, repo_id: str) -> Repo | None:
        user, bad = self._user()
        if bad:
            self._error(401, "Invalid credentials in Authorization header")
            return None
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and repo.owner != user):
            self._error(404 if user else 401, "Repository not found", code="RepoNotFound")
            return None
        return repo

    def _readable_revision(self, repo_id: str, revision: str) -> tuple[Repo, str, dict] | None:
        """``(repo, commit oid, files)`` at ``revision``, or None after answering 401/404."""
        stored = self._readable_repo(repo_id)
        if stored is None:
            return None
        found = stored.at(revision)
        if found is None:
            self._error(404, f"Revision {revision} not found", code="RevisionNotFound")
            return None
        return (stored, *found)

    # --- API ------------------------------------------------------------------------------------------------------
    def whoami(self, **_) -> None:
        user, _bad = self._user()
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def create_repo(self, body: bytes, **_) -> None:
        user, bad = self._user()
        if bad or user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        payload = json.loads(body)
        namespace = payload.get("organization") or user
        if payload.get("type", "model") != "model":
            return self._error(400, "Only model repositories are served here")
        if namespace != user:
            return self._error(403, f"You don't have the rights to create a repo under {namespace}")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.state.url}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            repo = Repo(owner=user, private=payload.get("visibility") == "private")
            repo.commit({".gitattributes": StoredFile(GITATTRIBUTES)}, "initial commit")
            self.state.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id})

    def validate_yaml(self, **_) -> None:
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, repo: str, revision: str, body: bytes, **_) -> None:
        stored = self._writable_repo(repo)
        if stored is None:
            return
        _, files = stored.head
        answer = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = item["path"].endswith(LFS_SUFFIXES) or b"\0" in sample or item["size"] > 10 * 1024 * 1024
            existing = files.get(item["path"])
            # The Hub answers the sha256 for an LFS file and the git blob id for a regular one (what the client
            # compares to skip unchanged files).
            oid = existing and (existing.lfs_sha256 or existing.git_oid)
            answer.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                           "oid": oid})
        self._json(200, {"files": answer, "commitOid": stored.head[0]})

    def lfs_batch(self, repo: str, body: bytes, **_) -> None:
        if self._writable_repo(repo) is None:
            return
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.state.url}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{self.state.url}/{repo}.git/info/lfs/objects/verify"}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, oid: str, body: bytes, **_) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "Uploaded content does not match its sha256")
        with self.state.lock:
            self.state.lfs_objects[oid] = body
            self.state.lfs_uploads.append(oid)
        self._send(200)

    def lfs_verify(self, repo: str, body: bytes, **_) -> None:
        if self._writable_repo(repo) is None:
            return
        payload = json.loads(body)
        content = self.state.lfs_objects.get(payload["oid"])
        if content is None or len(content) != payload["size"]:
            return self._error(404, "LFS object not found or wrong size")
        self._json(200, {"success": True})

    def commit(self, repo: str, revision: str, body: bytes, **_) -> None:
        stored = self._writable_repo(repo)
        if stored is None:
            return
        if revision != "main":
            return self._error(404, f"Revision {revision} not found", code="RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        with self.state.lock:
            head_oid, head_files = stored.head
            if header.get("parentCommit") not in (None, head_oid):
                return self._error(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head_files)
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = StoredFile(base64.b64decode(value["content"]))
                elif line["key"] == "lfsFile":
                    content = self.state.lfs_objects.get(value["oid"])
                    if content is None:
                        return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = StoredFile(content, lfs_sha256=value["oid"])
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif line["key"] == "deletedFolder":
                    files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            oid = stored.commit(files, header["summary"])
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.state.url}/{repo}/commit/{oid}",
                         "hookOutput": "", "pullRequestUrl": None})

    def model_info(self, repo: str, revision: str | None = None, **_) -> None:
        found = self._readable_revision(repo, revision or "main")
        if found is None:
            return
        stored, oid, files = found
        siblings = [{"rfilename": path, "size": len(f.content), "blobId": f.git_oid,
                     **({"lfs": {"sha256": f.lfs_sha256, "size": len(f.content), "pointerSize": 134}}
                        if f.lfs_sha256 else {})}
                    for path, f in sorted(files.items())]
        self._json(200, {"id": repo, "modelId": repo, "author": stored.owner, "sha": oid, "private": stored.private,
                         "lastModified": "2025-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
                         "library_name": "transformers", "siblings": siblings})

    def tree(self, repo: str, revision: str, query: dict, path: str | None = None, **_) -> None:
        found = self._readable_revision(repo, revision)
        if found is None:
            return
        stored, _, files = found
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{path.strip('/')}/" if path else ""
        entries, folders = [], set()
        for name, stored_file in sorted(files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(rest[:depth]))
            if not recursive and len(rest) > 1:
                continue
            entry = {"type": "file", "oid": stored_file.git_oid, "size": len(stored_file.content), "path": name}
            if stored_file.lfs_sha256:
                entry["lfs"] = {"oid": stored_file.lfs_sha256, "size": len(stored_file.content), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": git_blob_oid(f.encode()), "size": 0, "path": f}
                    for f in sorted(folders)]
        self._json(200, entries)

    def resolve(self, repo: str, revision: str, filename: str) -> None:
        found = self._readable_revision(repo, revision)
        if found is None:
            return
        stored, oid, files = found
        stored_file = files.get(filename)
        if stored_file is None:
            return self._error(404, f"{filename} not found", code="EntryNotFound", headers={"X-Repo-Commit": oid})
        headers = {"X-Repo-Commit": oid, "Accept-Ranges": "bytes"}
        if stored_file.lfs_sha256:
            headers |= {"ETag": f'"{stored_file.lfs_sha256}"', "X-Linked-Etag": f'"{stored_file.lfs_sha256}"',
                        "X-Linked-Size": str(len(stored_file.content))}
        else:
            headers["ETag"] = f'"{stored_file.git_oid}"'
        self._send(200, stored_file.content, headers, content_type="application/octet-stream")


ROUTES = [
    ("GET", r"/api/whoami-v2", _HubHandler.whoami),
    ("POST", r"/api/repos/create", _HubHandler.create_repo),
    ("POST", r"/api/validate-yaml", _HubHandler.validate_yaml),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", _HubHandler.preupload),
    ("POST", rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", _HubHandler.commit),
    ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?", _HubHandler.tree),
    ("GET", rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?", _HubHandler.model_info),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", _HubHandler.lfs_batch),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", _HubHandler.lfs_verify),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", _HubHandler.lfs_upload),
]
