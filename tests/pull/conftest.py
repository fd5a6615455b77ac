"""A small, real HTTP registry that misbehaves on purpose.

It speaks the distribution API over real sockets (http.server in a thread on a loopback
address) for the behaviour a real registry will not show on demand: lying digests, dropped
connections, 429/5xx, Bearer token flows, cross-host redirects, slow blobs.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.support.imagebuilder import Layer, build_config, sha256_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeImage:
    reference: str
    repo: str
    manifest_digest: str
    layers: list[Layer]
    layer_digests: list[str]
    diff_ids: list[str]
    manifest_body: bytes


@dataclass
class FakeServer:
    """State and knobs of one fake server; tests mutate the knobs directly."""

    host: str = "127.0.0.1"
    port: int = 0
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    # knobs
    lying_blobs: dict[str, bytes] = field(default_factory=dict)    # digest -> served bytes
    drop_after: dict[str, int] = field(default_factory=dict)       # digest -> bytes, once
    ignore_range: bool = False
    # path substring -> list of (status, headers) served (and consumed) before success;
    # status 0 drops the connection without an answer
    failures: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    bearer: bool = False
    token_lifetime: int | None = 300
    token_key: str = "token"
    basic: tuple[str, str] | None = None                  # required Basic creds (also for /token)
    redirect_blobs_to: str | None = None                 # base URL serving /blob/<digest>
    challenge_on_storage: bool = False                    # /blob/ answers 401 + Basic challenge
    slow_blobs: dict[str, float] = field(default_factory=dict)  # digest -> s per slow_chunk
    slow_chunk: int = 4096
    # path substring -> seconds per byte: the whole answer (manifest, token) is trickled
    trickle: dict[str, float] = field(default_factory=dict)
    # path substrings where the request is read and never answered
    hang: list[str] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    tokens: dict[str, str] = field(default_factory=dict)  # token -> scope
    identity_token: str | None = None                     # accepted refresh token (POST /token)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.netloc}"

    def requests_to(self, fragment: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if fragment in s.path]

    # -- content ---------------------------------------------------------------------------
    def add_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        digest = sha256_digest(body)
        self.manifests[(repo, ref)] = (body, media_type)
        self.manifests[(repo, digest)] = (body, media_type)
        return digest

    def add_image(self, repo: str, tag: str, layers: list[Layer], *,
                  diff_ids: list[str] | None = None, urls: dict[int, list[str]] | None = None,
                  push_layers: bool = True) -> FakeImage:
        config = json.dumps(build_config(layers, diff_ids=diff_ids)).encode()
        config_digest = self.add_blob(config)
        digests = []
        for layer in layers:
            digests.append(sha256_digest(layer.blob))
            if push_layers:
                self.add_blob(layer.blob)
        layer_descs: list[dict[str, Any]] = []
        for i, (layer, d) in enumerate(zip(layers, digests, strict=True)):
            desc: dict[str, Any] = {"mediaType": layer.media_type_for("oci"), "digest": d,
                                    "size": layer.size}
            if urls and i in urls:
                desc["urls"] = urls[i]
                desc["mediaType"] = "application/vnd.oci.image.layer.nondistributable.v1.tar"
            layer_descs.append(desc)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                               "size": len(config)},
                    "layers": layer_descs}
        body = json.dumps(manifest).encode()
        digest = self.add_manifest(repo, tag, body, OCI_MANIFEST)
        return FakeImage(f"{self.netloc}/{repo}:{tag}", repo, digest, layers, digests,
                         diff_ids or [layer.diff_id for layer in layers], body)


def _make_handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "HEAD":
                return
            delay = next((d for f, d in state.trickle.items() if f in self.path), None)
            if delay is None:
                self.wfile.write(body)
                return
            try:
                for i in range(len(body)):
                    if state.stopped.is_set():
                        return
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(delay)
            except OSError:
                pass  # the client gave up: fine

        def _error(self, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> None:
            body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
            self._send(status, body, headers)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_POST(self) -> None:
            # OAuth2 refresh-token grant (identity tokens from ``docker login``)
            length = int(self.headers.get("Content-Length") or 0)
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            with state.lock:
                state.seen.append(Seen("POST", self.path, dict(self.headers.items())))
                state.token_requests.append(dict(form, method="POST"))
            if urllib.parse.urlsplit(self.path).path != "/token" or \
                    form.get("grant_type") != "refresh_token" or \
                    form.get("refresh_token") != state.identity_token:
                return self._error(401, "UNAUTHORIZED", "bad refresh token")
            token = secrets.token_hex(8)
            with state.lock:
                state.tokens[token] = form.get("scope", "")
            self._send(200, json.dumps({"access_token": token, "expires_in": 300}).encode())

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            with state.lock:
                state.seen.append(Seen(self.command, self.path, dict(self.headers.items())))
                for fragment, queue in state.failures.items():
                    if fragment in self.path and queue:
                        status, headers = queue.pop(0)
                        break
                else:
                    status = -1
            if any(f in self.path for f in state.hang):
                state.stopped.wait(60)   # accepted, read, never answered
                self.close_connection = True
                return
            if status == 0:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if status > 0:
                return self._error(status, "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE",
                                   "try later", headers)
            if path == "/token":
                return self._token()
            if path.startswith("/blob/"):
                if state.challenge_on_storage:
                    return self._error(401, "UNAUTHORIZED", "storage wants auth",
                                       {"WWW-Authenticate": 'Basic realm="storage"'})
                return self._blob(path[len("/blob/"):])
            if path == "/v2/" or path == "/v2":
                if not self._authorized(None):
                    return
                return self._send(200, b"{}")
            parts = path[len("/v2/"):].split("/")
            if len(parts) < 3 or parts[-2] not in ("manifests", "blobs"):
                return self._error(404, "NOT_FOUND", "no route")
            repo, kind, ref = "/".join(parts[:-2]), parts[-2], urllib.parse.unquote(parts[-1])
            if not self._authorized(repo):
                return
            if kind == "manifests":
                found = state.manifests.get((repo, ref))
                if found is None:
                    return self._error(404, "MANIFEST_UNKNOWN", "manifest unknown")
                body, media_type = found
                return self._send(200, body, {"Docker-Content-Digest": sha256_digest(body)},
                                  content_type=media_type)
            if state.redirect_blobs_to:
                return self._send(307, b"", {
                    "Location": f"{state.redirect_blobs_to}/blob/{ref}?sig=SIGNED-SECRET"})
            return self._blob(ref)

        def _authorized(self, repo: str | None) -> bool:
            auth = self.headers.get("Authorization", "")
            if state.bearer:
                token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
                scope = state.tokens.get(token)
                if scope is not None and (repo is None or scope == f"repository:{repo}:pull"):
                    return True
                params = f'realm="{state.url}/token",service="fake-registry"'
                if repo:
                    params += f',scope="repository:{repo}:pull"'
                self._error(401, "UNAUTHORIZED", "authentication required",
                            {"WWW-Authenticate": f"Bearer {params}"})
                return False
            if state.basic:
                if auth == _basic(*state.basic):
                    return True
                self._error(401, "UNAUTHORIZED", "authentication required",
                            {"WWW-Authenticate": 'Basic realm="fake"'})
                return False
            return True

        def _token(self) -> None:
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
            with state.lock:
                state.token_requests.append(dict(query, authorization=self.headers.get(
                    "Authorization", "")))
            if state.basic and self.headers.get("Authorization") != _basic(*state.basic):
                return self._error(401, "UNAUTHORIZED", "bad credentials")
            token = secrets.token_hex(8)
            with state.lock:
                state.tokens[token] = query.get("scope", "")
            doc: dict[str, Any] = {state.token_key: token}
            if state.token_lifetime is not None:
                doc["expires_in"] = state.token_lifetime
            self._send(200, json.dumps(doc).encode())

        def _blob(self, digest: str) -> None:
            data = state.lying_blobs.get(digest, state.blobs.get(digest))
            if data is None:
                return self._error(404, "BLOB_UNKNOWN", "blob unknown")
            start = 0
            rng = self.headers.get("Range")
            if rng and not state.ignore_range:
                start = int(rng.split("=", 1)[1].split("-", 1)[0])
            body = data[start:]
            status = 206 if start else 200
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            with state.lock:
                cut = state.drop_after.pop(digest, None)
            delay = state.slow_blobs.get(digest)
            if cut is not None:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if delay:
                try:
                    step = state.slow_chunk
                    for i in range(0, len(body), step):
                        if state.stopped.is_set():
                            return
                        self.wfile.write(body[i:i + step])
                        self.wfile.flush()
                        time.sleep(delay)
                except OSError:
                    pass  # the client went away (canceled): fine
                return
            self.wfile.write(body)

    return Handler


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-body (cancel tests, dropped connections) are expected here.
        import sys
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


@pytest.fixture
def fake_server_factory() -> Iterator[Any]:
    """``make(host="127.0.0.1") -> FakeServer`` running until the test ends."""
    servers: list[_Server] = []
    states: list[FakeServer] = []

    def make(host: str = "127.0.0.1", tls: tuple[str, str] | None = None) -> FakeServer:
        """``tls=(certfile, keyfile)`` serves HTTPS."""
        state = FakeServer(host=host)
        server = _Server((host, 0), _make_handler(state))
        if tls is not None:
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        state.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        servers.append(server)
        states.append(state)
        return state

    yield make
    for st in states:
        st.stopped.set()
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.fixture
def fake_registry(fake_server_factory: Any) -> FakeServer:
    return fake_server_factory("127.0.0.1")
