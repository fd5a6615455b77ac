"""HTTP transport for registries: sessions, schemes, timeouts and retries.

HTTPS by default; plain HTTP for loopback hosts (as Docker does) and for hosts listed in
``insecure_registries``. A custom CA bundle comes from ``REQUESTS_CA_BUNDLE`` or
``SSL_CERT_FILE`` (requests reads them because ``trust_env`` stays on). 429, 5xx and dropped
connections are retried with exponential backoff, honouring ``Retry-After`` up to
``max_retry_after``. Redirects are followed by requests, which drops ``Authorization`` when
the host changes; :class:`~worker.pull.auth.RegistryAuth` never adds it back for another host.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import logging
import os
import random
import socket
import threading
import time
import urllib.parse
from typing import Any

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from worker.errors import Canceled, RegistryError
from worker.settings import Settings

log = logging.getLogger(__name__)

USER_AGENT = "rootfs-export/0.1"
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: exceptions meaning "the connection failed or dropped": worth retrying
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
)
#: a refused connection is retried this often at most (a registry restarting)
REFUSED_RETRIES = 2


def split_host(host: str) -> str:
    """``[::1]:5000`` -> ``::1``; ``localhost:5000`` -> ``localhost``."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    name = split_host(host).lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def scheme_for(host: str, settings: Settings) -> str:
    """"http" for loopback and insecure registries, else "https"."""
    insecure = {h.lower() for h in settings.insecure_registries}
    if is_loopback(host) or host.lower() in insecure or split_host(host).lower() in insecure:
        return "http"
    return "https"


def timeouts(settings: Settings) -> tuple[float, float]:
    return (settings.connect_timeout, settings.read_timeout)


def redact_url(url: str) -> str:
    """A URL fit for messages: no query (signed URLs carry credentials there), no userinfo."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if ":" in (parts.hostname or ""):
        netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def make_session(settings: Settings) -> requests.Session:
    """A session with connection pools sized for concurrent downloads and no hidden retries."""
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    pool = settings.download_concurrency + 4
    # max_retries=0: urllib3 must not retry on its own; request_with_retries owns the policy.
    adapter = HTTPAdapter(pool_connections=pool, pool_maxsize=pool, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # requests honours REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE itself (trust_env) but not
    # OpenSSL's SSL_CERT_FILE / SSL_CERT_DIR, which people set for a private CA.
    if not (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")):
        ca = os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR")
        if ca:
            session.verify = ca
    return session


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error, without URLs (they may be signed)."""
    reason: BaseException | None = exc
    while reason is not None and (reason.__context__ or reason.__cause__) is not None:
        reason = reason.__cause__ or reason.__context__
    text = str(reason or exc)
    return text.split("(Caused by")[0].strip()[:200] or type(exc).__name__


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


def backoff_delay(attempt: int, settings: Settings, retry_after: float | None = None) -> float:
    """Delay before retry number ``attempt`` (0-based): Retry-After if given, else exponential."""
    if retry_after is not None:
        return min(retry_after, settings.max_retry_after)
    base = settings.retry_backoff * (2 ** attempt)
    return min(base * (0.5 + random.random() / 2) + base / 2, settings.max_retry_after)


def sleep(delay: float, cancel: threading.Event | None) -> None:
    """Sleep, waking up early (and raising Canceled) if ``cancel`` gets set."""
    if delay <= 0:
        if cancel is not None and cancel.is_set():
            raise Canceled("canceled")
        return
    if cancel is None:
        time.sleep(delay)
    elif cancel.wait(delay):
        raise Canceled("canceled")


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it wraps (causes, contexts, urllib3 ``reason``, first argument)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 20:
        e = todo.pop(0)
        if any(e is s for s in seen):
            continue
        seen.append(e)
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None),
                    e.args[0] if e.args else None, e.args[1] if len(e.args) > 1 else None):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return seen


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    return next((e for e in _causes(exc) if isinstance(e, kind)), None)


def _host_of(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return parts.netloc.rpartition("@")[2] or url


def _prefix(what: str, image: str | None) -> str:
    return f"{image}: {what}" if image and not what.startswith(image) else what


def deadline_error(what: str, url: str, settings: Settings, *,
                   image: str | None = None) -> RegistryError:
    """The error for a request that did not finish within ``request_deadline``."""
    return RegistryError(f"{_prefix(what, image)}: {redact_url(url)} did not answer completely "
                         f"within {settings.request_deadline:g} s "
                         "(ROOTFS_EXPORT_REQUEST_DEADLINE)", image=image, url=redact_url(url),
                         transient=True)


def read_body(resp: requests.Response, limit: int, *, what: str,
              deadline: float | None = None, settings: Settings | None = None,
              image: str | None = None) -> bytes:
    """Read a (streamed) response body of at most ``limit`` bytes, before ``deadline``.

    Pieces are read as they arrive (``read1``), so a body trickled one byte at a time still
    hits the deadline.
    """
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RegistryError(f"{what}: {declared} bytes exceeds the limit of {limit}", image=image)
    parts: list[bytes] = []
    total = 0
    try:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                assert settings is not None
                raise deadline_error(what, resp.url or "", settings)
            piece = resp.raw.read1(64 << 10, decode_content=True)
            if not piece:
                break
            total += len(piece)
            if total > limit:
                raise RegistryError(f"{what}: more than the limit of {limit} bytes", image=image)
            parts.append(piece)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        if _find(exc, TimeoutError) is not None or _find(exc, requests.Timeout) is not None \
                or isinstance(exc, urllib3.exceptions.ReadTimeoutError):
            raise RegistryError(f"{what}: the registry stopped sending the body "
                                f"(no data for {timeouts(settings)[1] if settings else '?'} s)",
                                image=image, transient=True) from None
        raise RegistryError(f"{what}: connection failed while reading: {_short(exc)}",
                            image=image, transient=True) from None
    return b"".join(parts)


def request_with_retries(session: requests.Session, method: str, url: str, *,
                         settings: Settings, what: str, image: str | None = None,
                         cancel: threading.Event | None = None, deadline: float | None = None,
                         **kwargs: Any) -> requests.Response:
    """Send a request, retrying 429/5xx and network failures with backoff.

    Returns the last response (possibly an error status the caller interprets); raises a
    transient :class:`RegistryError` when the retries are exhausted on network errors or
    retryable statuses. A name that does not resolve fails at once; a refused connection is
    retried twice at most, a timeout ``timeout_retries`` times; a ``Retry-After`` longer than
    ``max_retry_after`` fails at once instead of sleeping. With ``deadline`` (a
    ``time.monotonic()`` value) every attempt, wait and (unless ``stream=True``) the body
    must be done by then.
    """
    connect_t, read_t = timeouts(settings)
    given = kwargs.pop("timeout", None)
    if isinstance(given, tuple):
        connect_t, read_t = given
    elif isinstance(given, (int, float)):
        connect_t = read_t = float(given)
    stream = bool(kwargs.pop("stream", False))
    where = _host_of(url)
    prefix = _prefix(what, image)
    attempt = 0
    refused = 0
    timed_out = 0
    while True:
        if cancel is not None and cancel.is_set():
            raise Canceled("canceled")
        retry_after: float | None = None
        timeout = (connect_t, read_t)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise deadline_error(what, url, settings, image=image)
            timeout = (min(connect_t, remaining), min(read_t, remaining))
        try:
            resp = session.request(method, url, timeout=timeout,
                                   stream=stream or deadline is not None, **kwargs)
            if deadline is not None and not stream:
                # requests would read the body with only a per-read timeout: read it here.
                body = read_body(resp, settings.max_manifest_bytes, what=prefix,
                                 deadline=deadline, settings=settings)
                resp._content = body
                resp._content_consumed = True  # type: ignore[attr-defined]
                resp.close()
        except RegistryError as exc:
            # raised by the auth hook (token service): say which image it was for
            if image and exc.image is None and not str(exc).startswith(image):
                exc.args = (f"{image}: {exc}",)
                exc.image = image
            raise
        except requests.exceptions.SSLError as exc:
            # Not transient: retrying will not make the certificate valid.
            raise RegistryError(f"{prefix}: TLS connection to {redact_url(url)} failed "
                                f"({_short(exc)}); for a private CA set REQUESTS_CA_BUNDLE or "
                                "SSL_CERT_FILE, for a plain-HTTP registry use "
                                "--insecure-registry", image=image,
                                url=redact_url(url)) from None
        except NETWORK_ERRORS as exc:
            gai = _find(exc, socket.gaierror)
            if gai is not None:
                # A name that does not resolve will not resolve in a second either.
                cause = getattr(gai, "strerror", None) or str(gai)
                raise RegistryError(f"{prefix}: cannot resolve {split_host(where)}: {cause}",
                                    image=image, url=redact_url(url),
                                    transient=getattr(gai, "errno", None) == socket.EAI_AGAIN
                                    ) from None
            header = _find(exc, http.client.HTTPException)
            if header is not None and not isinstance(header, (http.client.RemoteDisconnected,
                                                              http.client.IncompleteRead)):
                raise RegistryError(f"{prefix}: {where} sent an oversized or invalid header "
                                    f"({_short(header)})", image=image,
                                    url=redact_url(url)) from None
            if _find(exc, ConnectionRefusedError) is not None:
                refused += 1
                if refused > min(settings.retries, REFUSED_RETRIES):
                    raise RegistryError(f"{prefix}: connection to {where} refused (is the "
                                        f"registry running there? {refused} attempts)",
                                        image=image, url=redact_url(url),
                                        transient=True) from None
            elif isinstance(exc, requests.Timeout) or _find(exc, TimeoutError) is not None:
                timed_out += 1
                if timed_out > min(settings.retries, settings.timeout_retries):
                    phase = "connect to" if isinstance(exc, requests.ConnectTimeout) \
                        else "get an answer from"
                    limit = timeout[0] if isinstance(exc, requests.ConnectTimeout) else timeout[1]
                    raise RegistryError(f"{prefix}: could not {phase} {where} within "
                                        f"{limit:.3g} s ({timed_out} attempts)", image=image,
                                        url=redact_url(url), transient=True) from None
            if attempt >= settings.retries:
                raise RegistryError(f"{prefix}: connection to {redact_url(url)} failed after "
                                    f"{attempt + 1} attempts: {_short(exc)}",
                                    image=image, url=redact_url(url), transient=True) from None
            log.info("%s: %s on %s, retrying", what, type(exc).__name__, redact_url(url))
        except requests.RequestException as exc:
            raise RegistryError(f"{prefix}: request to {redact_url(url)} failed: "
                                f"{_short(exc)}", image=image,
                                url=redact_url(url)) from None
        else:
            if resp.status_code not in RETRY_STATUS:
                return resp
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            if attempt >= settings.retries:
                return resp
            if retry_after is not None and retry_after > settings.max_retry_after:
                resp.close()
                raise RegistryError(f"{prefix}: registry asked to retry after "
                                    f"{retry_after:g} s (HTTP {resp.status_code}), more than "
                                    "ROOTFS_EXPORT_MAX_RETRY_AFTER="
                                    f"{settings.max_retry_after:g}", image=image,
                                    status=resp.status_code, url=redact_url(url),
                                    transient=True)
            resp.close()
            log.info("%s: HTTP %d from %s, retrying", what, resp.status_code,
                     redact_url(resp.url or url))
        delay = backoff_delay(attempt, settings, retry_after)
        if refused and retry_after is None:
            delay = min(delay, 1.0)
        if deadline is not None and time.monotonic() + delay > deadline:
            raise deadline_error(what, url, settings, image=image)
        sleep(delay, cancel)
        attempt += 1
