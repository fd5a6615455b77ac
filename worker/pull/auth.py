"""Registry authentication as a requests ``AuthBase``: anonymous, Bearer tokens, Basic.

Every request first goes out with what is already known for its repository (a cached token,
Basic credentials) or anonymously. A 401 from the registry host is answered from its
``WWW-Authenticate`` challenge: ``Bearer realm=..,service=..,scope=..`` fetches a token from the
realm (with Basic credentials or an identity token if we have them) and retries once; ``Basic``
retries once with the credentials. Tokens are cached per (realm, service, scope) until
``expires_in`` (60 s when absent). Nothing is ever sent to a host other than the registry's
(redirect targets) or the token realm it named. Token requests are retried like every registry
request (429/5xx and dropped connections, with backoff and ``Retry-After``:
:func:`~worker.pull.transport.request_with_retries`).
"""

from __future__ import annotations

import base64
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import requests
from requests.auth import AuthBase

from worker.errors import AuthenticationError, RegistryError
from worker.pull.credentials import Credentials
from worker.pull.transport import RETRY_STATUS, request_with_retries
from worker.settings import Settings

DEFAULT_TOKEN_LIFETIME = 60.0
#: refresh a token this long before it expires, so it does not expire in flight
EXPIRY_MARGIN = 5.0
_REPO_RE = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags|referrers)(?:/|$)")
_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str                # "bearer" | "basic"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse the first challenge of a ``WWW-Authenticate`` header."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else (m.group(3) or "")
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


def repository_of(url: str) -> str | None:
    """``.../v2/library/alpine/blobs/sha256:..`` -> ``library/alpine``."""
    m = _REPO_RE.match(urllib.parse.urlsplit(url).path)
    return m.group(1) if m else None


def _netloc(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc.lower()


class RegistryAuth(AuthBase):
    """Challenge-driven auth for one registry host; thread-safe, shared by a client's threads."""

    def __init__(self, registry_url: str, credentials: Credentials | None,
                 session: requests.Session, settings: Settings) -> None:
        self.netloc = _netloc(registry_url)
        self.credentials = credentials
        self._session = session
        self._settings = settings
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
        # what each repository (None: the /v2/ root) was last challenged with
        self._known: dict[str | None, tuple[str, str, str, str]] = {}
        #: token endpoint calls made (observable in tests)
        self.token_fetches = 0

    def __repr__(self) -> str:
        return f"RegistryAuth({self.netloc!r}, credentials={self.credentials!r})"

    # -- requests hooks ------------------------------------------------------------------
    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        url = r.url or ""
        if _netloc(url) != self.netloc:
            return r
        header = self._known_header(repository_of(url))
        if header:
            r.headers["Authorization"] = header
        r.register_hook("response", self._handle_401)
        return r

    def _handle_401(self, resp: requests.Response, **kwargs: Any) -> requests.Response:
        if resp.status_code != 401:
            return resp
        req = resp.request
        # Only the registry host gets credentials: a redirect target answering 401 (object
        # storage, another host) is left alone.
        if _netloc(resp.url or "") != self.netloc or _netloc(req.url or "") != self.netloc:
            return resp
        if getattr(req, "_rootfs_auth_retry", False):
            return resp
        challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            return resp
        repo = repository_of(req.url or "")
        had_auth = "Authorization" in req.headers
        if challenge.scheme == "bearer":
            realm = challenge.params.get("realm", "")
            if not realm.startswith(("http://", "https://")):
                raise RegistryError(f"registry {self.netloc} sent a Bearer challenge without a "
                                    "usable realm", url=resp.url, status=401)
            service = challenge.params.get("service", "")
            scope = challenge.params.get("scope") or (f"repository:{repo}:pull" if repo else "")
            with self._lock:
                self._known[repo] = ("bearer", realm, service, scope)
            token = self._token(realm, service, scope, force=had_auth)
            header = f"Bearer {token}"
        elif challenge.scheme == "basic":
            basic = self.credentials.basic if self.credentials else None
            if basic is None or had_auth:
                return resp
            with self._lock:
                self._known[repo] = ("basic", "", "", "")
            header = _basic_header(*basic)
        else:
            return resp
        # Drain and release the 401 before re-sending on a pooled connection.
        _ = resp.content
        resp.close()
        prep = req.copy()
        prep.headers["Authorization"] = header
        prep._rootfs_auth_retry = True  # type: ignore[attr-defined]
        new = resp.connection.send(prep, **kwargs)
        new.history.append(resp)
        new.request = prep
        return new

    # -- tokens ------------------------------------------------------------------------
    def _known_header(self, repo: str | None) -> str | None:
        with self._lock:
            known = self._known.get(repo)
            if known is None:
                return None
            scheme, realm, service, scope = known
            if scheme == "basic":
                basic = self.credentials.basic if self.credentials else None
                return _basic_header(*basic) if basic else None
            cached = self._tokens.get((realm, service, scope))
            if cached and cached[1] > time.monotonic():
                return f"Bearer {cached[0]}"
        return None

    def _token(self, realm: str, service: str, scope: str, *, force: bool = False) -> str:
        key = (realm, service, scope)
        with self._lock:
            cached = self._tokens.get(key)
            if cached and cached[1] > time.monotonic() and not force:
                return cached[0]
            token, lifetime = self._fetch_token(realm, service, scope)
            self._tokens[key] = (token, time.monotonic() + max(lifetime - EXPIRY_MARGIN, 1.0))
            return token

    def _fetch_token(self, realm: str, service: str, scope: str) -> tuple[str, float]:
        self.token_fetches += 1
        creds = self.credentials
        where = f"token service {urllib.parse.urlsplit(realm).netloc}"
        # 429/5xx and dropped connections are retried like any registry request; what is
        # left after the retries (or any other status) is judged below.
        if creds is not None and creds.identity_token:
            data = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "service": service, "client_id": "rootfs-export"}
            if scope:
                data["scope"] = scope
            resp = request_with_retries(self._session, "POST", realm, settings=self._settings,
                                        what=where, data=data, allow_redirects=False,
                                        deadline=time.monotonic() +
                                        self._settings.request_deadline)
        else:
            params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
            basic = creds.basic if creds else None
            resp = request_with_retries(self._session, "GET", realm, settings=self._settings,
                                        what=where, params=params, auth=basic,
                                        deadline=time.monotonic() +
                                        self._settings.request_deadline)
        if resp.status_code in (401, 403):
            who = f"as {creds.username!r}" if creds and creds.username else "anonymously"
            raise AuthenticationError(f"{where} refused a token {who} for scope {scope!r} "
                                      f"(HTTP {resp.status_code}); check the credentials "
                                      "(--username/--password-stdin or docker login)",
                                      status=resp.status_code)
        if resp.status_code != 200:
            tries = "" if resp.status_code not in RETRY_STATUS else \
                f" after {self._settings.retries + 1} attempts"
            raise RegistryError(f"{where} answered HTTP {resp.status_code}{tries}",
                                status=resp.status_code,
                                transient=resp.status_code in RETRY_STATUS)
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            raise RegistryError(f"{where} returned an unreadable token response") from None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{where} returned no token")
        return token, lifetime


def _basic_header(username: str, password: str) -> str:
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")
