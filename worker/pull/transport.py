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
import ipaddress
import logging
import os
import random
import threading
import time
import urllib.parse
from typing import Any

import requests
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


def request_with_retries(session: requests.Session, method: str, url: str, *,
                         settings: Settings, what: str, image: str | None = None,
                         cancel: threading.Event | None = None, **kwargs: Any
                         ) -> requests.Response:
    """Send a request, retrying 429/5xx and network failures with backoff.

    Returns the last response (possibly an error status the caller interprets); raises a
    transient :class:`RegistryError` when the retries are exhausted on network errors or
    retryable statuses.
    """
    kwargs.setdefault("timeout", timeouts(settings))
    attempt = 0
    while True:
        if cancel is not None and cancel.is_set():
            raise Canceled("canceled")
        retry_after: float | None = None
        try:
            resp = session.request(method, url, **kwargs)
        except requests.exceptions.SSLError as exc:
            # Not transient: retrying will not make the certificate valid.
            raise RegistryError(f"{what}: TLS connection to {redact_url(url)} failed "
                                f"({_short(exc)}); for a private CA set REQUESTS_CA_BUNDLE or "
                                "SSL_CERT_FILE, for a plain-HTTP registry use "
                                "--insecure-registry", image=image,
                                url=redact_url(url)) from None
        except NETWORK_ERRORS as exc:
            if attempt >= settings.retries:
                raise RegistryError(f"{what}: connection to {redact_url(url)} failed after "
                                    f"{attempt + 1} attempts: {type(exc).__name__}",
                                    image=image, url=redact_url(url), transient=True) from None
            log.info("%s: %s on %s, retrying", what, type(exc).__name__, redact_url(url))
        except requests.RequestException as exc:
            raise RegistryError(f"{what}: request to {redact_url(url)} failed: "
                                f"{type(exc).__name__}", image=image,
                                url=redact_url(url)) from None
        else:
            if resp.status_code not in RETRY_STATUS:
                return resp
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            if attempt >= settings.retries:
                return resp
            resp.close()
            log.info("%s: HTTP %d from %s, retrying", what, resp.status_code,
                     redact_url(resp.url or url))
        sleep(backoff_delay(attempt, settings, retry_after), cancel)
        attempt += 1
