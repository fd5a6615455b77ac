"""The registry client: manifests, configs and verified blob streams over the distribution API."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import requests
import urllib3.exceptions

from worker.errors import (
    AuthenticationError,
    Canceled,
    ConfigError,
    DigestMismatch,
    ManifestNotFound,
    PlatformNotFound,
    RegistryError,
    UnsupportedManifest,
)
from worker.pull.auth import RegistryAuth
from worker.pull.credentials import Credentials, CredentialSource
from worker.pull.manifest import (
    FOREIGN_LAYER_TYPES,
    MANIFEST_ACCEPT,
    Descriptor,
    ImageIndex,
    ImageManifest,
    Platform,
    ResolvedImage,
    parse_config,
    parse_manifest,
    select_platform,
)
from worker.pull.reference import Reference
from worker.pull.transport import (
    backoff_delay,
    make_session,
    read_body,
    redact_url,
    request_with_retries,
    scheme_for,
    sleep,
)
from worker.settings import Settings

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
MAX_CONFIG_BYTES = 16 << 20
#: hand on what arrived at least this often (progress, cancel) on slow links
FLUSH_INTERVAL = 0.25
#: exceptions raised while reading a response body when the connection drops
_BODY_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError,
    urllib3.exceptions.SSLError, requests.ConnectionError, requests.Timeout,
    ConnectionError, TimeoutError, OSError,
)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    """Talks to one registry host. Thread-safe: layer downloads share one client."""

    def __init__(self, registry: str, settings: Settings, *,
                 credentials: Credentials | CredentialSource | None = None,
                 session: requests.Session | None = None) -> None:
        self.registry = registry
        self.settings = settings
        api_host = Reference(registry, "x", None, None).api_host
        self.base_url = f"{scheme_for(api_host, settings)}://{api_host}"
        if isinstance(credentials, Credentials):
            creds: Credentials | None = credentials
        else:
            source = credentials if credentials is not None else CredentialSource()
            creds = source.get(registry)
        self.session = session or make_session(settings)
        self.auth = RegistryAuth(self.base_url, creds, self.session, settings)

    @classmethod
    def for_reference(cls, ref: Reference, settings: Settings, *,
                      credentials: Credentials | CredentialSource | None = None
                      ) -> RegistryClient:
        return cls(ref.registry, settings, credentials=credentials)

    def __repr__(self) -> str:
        return f"RegistryClient({self.base_url!r})"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------
    def _url(self, ref: Reference, kind: str, target: str) -> str:
        return f"{self.base_url}/v2/{ref.repository}/{kind}/{urllib.parse.quote(target, safe=':')}"

    def _get(self, url: str, *, what: str, image: str, cancel: threading.Event | None = None,
             **kwargs: Any) -> requests.Response:
        return request_with_retries(self.session, "GET", url, settings=self.settings, what=what,
                                    image=image, cancel=cancel, auth=self.auth, **kwargs)

    def _raise_for(self, resp: requests.Response, *, what: str, image: str,
                   not_found: type[RegistryError] = RegistryError) -> None:
        status = resp.status_code
        if status < 400:
            return
        detail = _error_detail(resp)
        url = redact_url(resp.url or "")
        resp.close()
        if status == 401:
            has = self.auth.credentials is not None
            hint = ("the registry rejected the credentials" if has else
                    "the registry requires authentication: pass --username with "
                    "--password-stdin, or log in with docker")
            raise AuthenticationError(f"{image}: {what}: {hint} (HTTP 401{detail})",
                                      image=image, status=status, url=url)
        if status == 403:
            raise AuthenticationError(f"{image}: {what}: access denied (HTTP 403{detail})",
                                      image=image, status=status, url=url)
        if status == 404:
            raise not_found(f"{image}: {what}: not found (HTTP 404{detail})", image=image,
                            status=status, url=url)
        raise RegistryError(f"{image}: {what}: HTTP {status}{detail} from {url}", image=image,
                            status=status, url=url, transient=status >= 500 or status == 429)

    # -- manifests -------------------------------------------------------------------------
    def _get_small(self, url: str, *, what: str, image: str, limit: int,
                   cancel: threading.Event | None, headers: dict[str, str] | None = None,
                   not_found: type[RegistryError] = RegistryError) -> tuple[bytes, str]:
        """GET a small document into memory (body, content type), retrying dropped bodies.

        Everything (retries, waits, the body) must be done within ``request_deadline``.
        """
        attempt = 0
        deadline = time.monotonic() + self.settings.request_deadline
        while True:
            resp = self._get(url, what=what, image=image, cancel=cancel, headers=headers,
                             stream=True, deadline=deadline)
            with resp:
                self._raise_for(resp, what=what, image=image, not_found=not_found)
                try:
                    body = read_body(resp, limit, what=f"{image}: {what}", deadline=deadline,
                                     settings=self.settings, image=image)
                except RegistryError as exc:
                    if not exc.transient or attempt >= self.settings.retries \
                            or "did not answer completely" in str(exc):
                        raise
                    attempt += 1
                    log.info("%s: %s, retrying", what, exc)
                    delay = backoff_delay(attempt - 1, self.settings)
                    if time.monotonic() + delay > deadline:
                        raise
                    sleep(delay, cancel)
                    continue
                return body, resp.headers.get("Content-Type", "")

    def get_manifest(self, ref: Reference, target: str | None = None, *,
                     cancel: threading.Event | None = None) -> tuple[bytes, str, str]:
        """Fetch a manifest or index: (body, content type, sha256 digest of the body).

        When ``target`` is a digest, the body must hash to it (DigestMismatch otherwise).
        """
        target = target or ref.target
        image = str(ref)
        body, content_type = self._get_small(
            self._url(ref, "manifests", target), what=f"manifest {target}", image=image,
            limit=self.settings.max_manifest_bytes, cancel=cancel,
            headers={"Accept": ", ".join(MANIFEST_ACCEPT)}, not_found=ManifestNotFound)
        digest = sha256_digest(body)
        if target.startswith("sha256:") and digest != target:
            raise DigestMismatch(f"{image}: manifest", target, digest)
        return body, content_type, digest

    def get_blob(self, ref: Reference, desc: Descriptor, *, max_bytes: int = MAX_CONFIG_BYTES,
                 what: str = "config", cancel: threading.Event | None = None) -> bytes:
        """Fetch a small blob (config) into memory and verify its digest."""
        image = str(ref)
        if desc.size > max_bytes:
            raise RegistryError(f"{image}: {what} {desc.digest} is {desc.size} bytes, more "
                                f"than the {max_bytes} allowed", image=image)
        body, _ = self._get_small(self._url(ref, "blobs", desc.digest),
                                  what=f"{what} {desc.digest}", image=image,
                                  limit=max(desc.size, 1), cancel=cancel)
        actual = sha256_digest(body)
        if actual != desc.digest:
            raise DigestMismatch(f"{image}: {what}", desc.digest, actual)
        return body

    def resolve(self, ref: Reference, platform: Platform | None = None, *,
                cancel: threading.Event | None = None) -> ResolvedImage:
        """Resolve ``ref`` to one platform's manifest and parsed config.

        ``platform`` None means this host's; with a single-platform image it is only checked
        when given explicitly (a single-arch image is what the user asked for).
        """
        image = str(ref)
        wanted = platform or Platform.host()
        body, ctype, digest = self.get_manifest(ref, cancel=cancel)
        parsed = parse_manifest(body, ctype, image=image)
        index_digest: str | None = None
        chosen_platform: Platform | None = None
        if isinstance(parsed, ImageIndex):
            index_digest = digest
            desc = select_platform(parsed, wanted, image=image)
            chosen_platform = desc.platform
            body, ctype, digest = self.get_manifest(ref, desc.digest, cancel=cancel)
            parsed = parse_manifest(body, ctype or desc.media_type, image=image)
            if isinstance(parsed, ImageIndex):
                raise UnsupportedManifest(f"{image}: nested indexes are not supported",
                                          image=image)
        manifest: ImageManifest = parsed
        config_raw = self.get_blob(ref, manifest.config, cancel=cancel)
        config = parse_config(config_raw, image=image)
        if len(config.diff_ids) != len(manifest.layers):
            raise UnsupportedManifest(f"{image}: the manifest lists {len(manifest.layers)} "
                                      f"layers but the config has {len(config.diff_ids)} "
                                      "diff_ids", image=image)
        config_platform = config.platform
        if index_digest is None and platform is not None and config_platform is not None \
                and not platform.matches(config_platform):
            raise PlatformNotFound(image, str(platform), [str(config_platform)], single=True)
        final_platform = chosen_platform or config_platform or wanted
        return ResolvedImage(reference=image, manifest_digest=digest,
                             index_digest=index_digest, media_type=manifest.media_type,
                             platform=final_platform, config_descriptor=manifest.config,
                             config=config, layers=manifest.layers)

    # -- blobs -----------------------------------------------------------------------------
    def blob_urls(self, ref: Reference, desc: Descriptor) -> list[str]:
        """Where a blob may be fetched from: the registry, then foreign ``urls`` if allowed."""
        urls = [self._url(ref, "blobs", desc.digest)]
        if desc.urls and self.settings.allow_foreign_urls:
            urls += [u for u in desc.urls if u.startswith(("https://", "http://"))]
        return urls

    def stream_blob(self, ref: Reference, desc: Descriptor, *,
                    cancel: threading.Event | None = None, what: str | None = None,
                    read_size: int = READ_SIZE) -> Iterator[bytes]:
        """Yield a blob's bytes as they arrive, verifying size and sha256.

        A dropped connection is resumed with ``Range: bytes=N-`` (a server answering 200
        instead of 206 is re-read from the start, skipping what we already have). The final
        chunk is followed by the verification: DigestMismatch is raised before the generator
        ends if the bytes do not hash to ``desc.digest``. ``cancel`` is checked between chunks.
        """
        image = str(ref)
        what = what or f"layer {desc.digest}"
        sha = hashlib.sha256()
        done = 0
        drops = 0
        stalls = 0
        settings = self.settings
        rate = settings.min_transfer_rate
        # A silent socket is a stall too: no need to wait the full read timeout for it.
        timeout = (settings.connect_timeout, min(settings.read_timeout, settings.stall_seconds)
                   if rate else settings.read_timeout)
        urls = self.blob_urls(ref, desc)
        url_idx = 0
        while True:
            if cancel is not None and cancel.is_set():
                raise Canceled(f"{image}: {what}: canceled")
            url = urls[url_idx]
            # identity: a transfer-compressed body would not hash to the blob digest
            headers = {"Accept-Encoding": "identity"}
            if done:
                headers["Range"] = f"bytes={done}-"
            auth = self.auth if url_idx == 0 else None
            resp = request_with_retries(self.session, "GET", url, settings=self.settings,
                                        what=what, image=image, cancel=cancel, auth=auth,
                                        headers=headers, stream=True, timeout=timeout)
            if resp.status_code == 404 and url_idx + 1 < len(urls):
                resp.close()
                url_idx += 1
                continue
            if resp.status_code == 404 and desc.urls and desc.media_type in FOREIGN_LAYER_TYPES \
                    and not self.settings.allow_foreign_urls:
                resp.close()
                raise ConfigError(f"{image}: {what} is a foreign (non-distributable) layer the "
                                  "registry does not serve; set ROOTFS_EXPORT_ALLOW_FOREIGN_URLS"
                                  "=true to fetch it from its urls")
            if resp.status_code == 416 and done:
                # Nothing left at our offset: the blob ends before the announced size.
                total = _range_total(resp)
                resp.close()
                raise _short_blob(image, what, desc, total if total is not None else done)
            self._raise_for(resp, what=what, image=image)
            skip = 0
            if done:
                if resp.status_code == 206 and _range_start(resp) == done:
                    pass
                elif resp.status_code == 200:
                    skip = done   # no Range support: re-read from 0, dropping what we have
                else:
                    resp.close()
                    raise RegistryError(f"{image}: {what}: bad answer to a Range request "
                                        f"(HTTP {resp.status_code})", image=image,
                                        status=resp.status_code, transient=True)
            offset = done if resp.status_code == 206 else 0
            total = _range_total(resp) if resp.status_code == 206 else None
            length = resp.headers.get("Content-Length", "")
            if total is None and length.isdigit():
                total = offset + int(length)
            if total is not None and total < desc.size:
                resp.close()
                raise _short_blob(image, what, desc, total)
            if total is not None and total > desc.size:
                resp.close()
                raise DigestMismatch(f"{image}: {what}", desc.digest,
                                     f"a blob of {total} bytes, larger than the {desc.size} "
                                     "bytes the manifest announces")
            pending = bytearray()
            received = 0
            unblock = _unblock_on_cancel(resp, cancel)
            try:
                with resp, unblock:
                    last_yield = time.monotonic()
                    window: collections.deque[tuple[float, int]] = collections.deque(
                        [(last_yield, done)])
                    while done < desc.size:
                        if cancel is not None and cancel.is_set():
                            raise Canceled(f"{image}: {what}: canceled")
                        # read1 returns what the socket has (so cancel is checked often even
                        # on a slow link); pieces are gathered into ~read_size chunks.
                        want = min(read_size - len(pending), desc.size - done) + skip
                        piece = resp.raw.read1(want, decode_content=False)
                        received += len(piece)
                        if not piece:
                            if length.isdigit() and received == int(length):
                                # a complete body, and still short of the announced size
                                raise _short_blob(image, what, desc, offset + received - skip)
                            raise ConnectionError("connection closed before the end of the blob")
                        if skip:
                            if len(piece) <= skip:
                                skip -= len(piece)
                                continue
                            piece = piece[skip:]
                            skip = 0
                        done += len(piece)
                        pending += piece
                        now = time.monotonic()
                        if rate:
                            _check_rate(window, now, done, desc.size, settings, image=image,
                                        what=what)
                        if len(pending) >= read_size or done >= desc.size or \
                                now - last_yield >= FLUSH_INTERVAL:
                            chunk = bytes(pending)
                            pending.clear()
                            last_yield = now
                            # Hashed per gathered chunk, not per socket read: each hash call
                            # drops and retakes the GIL, which the indexing thread may hold.
                            sha.update(chunk)
                            yield chunk
                    # A server sending more than the descriptor's size is lying about the blob.
                    extra = resp.raw.read(1, decode_content=False)
                    if extra:
                        raise DigestMismatch(f"{image}: {what}", desc.digest,
                                             f"a blob larger than the announced {desc.size} "
                                             "bytes")
                break
            except _TransferTooSlow as exc:
                error: BaseException = exc
                stalls += 1
            except _BODY_ERRORS as exc:
                error = exc
                if isinstance(exc, (urllib3.exceptions.ReadTimeoutError, TimeoutError,
                                    requests.Timeout)):
                    stalls += 1
            # Bytes received before the drop are good: hand them on, then resume after them.
            if pending:
                chunk = bytes(pending)
                pending.clear()
                sha.update(chunk)
                yield chunk
            drops += 1
            if isinstance(error, _TransferTooSlow) and stalls > min(settings.timeout_retries,
                                                                   settings.retries):
                raise RegistryError(str(error), image=image, transient=True) from None
            if stalls > min(settings.timeout_retries, settings.retries):
                raise RegistryError(f"{image}: {what}: the registry stopped sending after "
                                    f"{done} of {desc.size} bytes (nothing for "
                                    f"{timeout[1]:.3g} s, {stalls} times)", image=image,
                                    transient=True) from None
            if drops > self.settings.retries:
                raise RegistryError(f"{image}: {what}: download kept failing after {done} "
                                    f"of {desc.size} bytes ({type(error).__name__})",
                                    image=image, transient=True) from None
            log.info("%s: connection dropped at %d/%d bytes, resuming", what, done, desc.size)
            sleep(backoff_delay(drops - 1, self.settings), cancel)
        actual = "sha256:" + sha.hexdigest()
        if actual != desc.digest:
            raise DigestMismatch(f"{image}: {what}", desc.digest, actual)


@contextlib.contextmanager
def _unblock_on_cancel(resp: requests.Response,
                       cancel: threading.Event | None) -> Iterator[None]:
    """While inside, a set ``cancel`` shuts the socket down, so a read blocked on a silent
    server returns at once instead of after the read timeout (Ctrl-C, SIGTERM, a failed
    sibling download)."""
    if cancel is None or not hasattr(resp.raw, "shutdown"):
        yield
        return
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.1):
            if cancel.is_set():
                with contextlib.suppress(Exception):
                    resp.raw.shutdown()
                return

    watcher = threading.Thread(target=watch, daemon=True, name="rootfs-export-unblock")
    watcher.start()
    try:
        yield
    finally:
        finished.set()


class _TransferTooSlow(Exception):
    """A blob arrives slower than ``min_transfer_rate`` (handled like a dropped connection)."""


def _check_rate(window: collections.deque[tuple[float, int]], now: float, done: int,
                size: int, settings: Settings, *, image: str, what: str) -> None:
    """Record ``done`` bytes at ``now``; raise if the last ``stall_seconds`` were too slow.

    ``window`` keeps (time, bytes) samples; its first one is the newest at least
    ``stall_seconds`` old, so the rate is measured over a full window once there is one.
    """
    span = settings.stall_seconds
    window.append((now, done))
    while len(window) > 1 and window[1][0] <= now - span:
        window.popleft()
    t0, d0 = window[0]
    if now - t0 >= span and done - d0 < settings.min_transfer_rate * (now - t0):
        raise _TransferTooSlow(
            f"{image}: {what}: transfer too slow: {done - d0} bytes in the last "
            f"{now - t0:.0f} s, below ROOTFS_EXPORT_MIN_TRANSFER_RATE="
            f"{settings.min_transfer_rate} bytes/s (over ROOTFS_EXPORT_STALL_SECONDS="
            f"{span:g}); {done} of {size} bytes received")


def _short_blob(image: str, what: str, desc: Descriptor, actual: int) -> RegistryError:
    return RegistryError(f"{image}: {what}: blob is {actual} bytes, shorter than the "
                         f"{desc.size} bytes the manifest announces", image=image)


def _range_total(resp: requests.Response) -> int | None:
    """The complete length from ``Content-Range: bytes a-b/N`` or ``bytes */N``."""
    total = resp.headers.get("Content-Range", "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _range_start(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Range", "")
    # "bytes 100-199/200"
    try:
        unit, _, rng = value.partition(" ")
        if unit.strip().lower() != "bytes":
            return None
        return int(rng.split("-", 1)[0])
    except ValueError:
        return None


def _error_detail(resp: requests.Response) -> str:
    """``, CODE: message`` from a distribution error body, short and credential-free."""
    try:
        body = resp.json() if len(resp.content) < 65536 else None
        err = body["errors"][0] if body else None
        if err:
            return f", {err.get('code', '')}: {str(err.get('message', ''))[:200]}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError,
            requests.RequestException):
        pass
    return ""
