"""Access control of the HTTP service: an optional token, checked on every request.

* The service binds 127.0.0.1 by default. Binding any other address needs a token
  (``auth.token=...`` or the environment variable ``CLIP_MED_SERVE_TOKEN``, which keeps it out of
  the process list and shell history); without one :func:`check_bind` refuses to start.
* With a token set, **every** request needs it: API clients send ``Authorization: Bearer <token>``;
  the browser page gets a ``clip_med_session`` cookie (HttpOnly, SameSite=Strict, a keyed hash of
  the token, never the token itself) from ``POST /auth/login``, the only route open without it.
  A browser that opens ``/`` without it gets a 401 whose body is a small form asking for the
  token once (no script, nothing from the archive). ``/``, the page's static files,
  ``/openapi.json`` and ``/docs`` are all behind the check. Comparisons use :func:`hmac.compare_digest`.
* Requests authenticated by the cookie that are not GET/HEAD must also carry the header
  ``X-Clip-Med: page`` (the page's ``fetch`` sends it; a cross-site form cannot, and CORS is off
  unless ``cors_origins`` is set), so another site cannot make the browser post uploads.
* The access log (this module's, replacing uvicorn's) records method, path, status and time only:
  never the query string (search texts), bodies, captions or metadata.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import parse_qs

log = logging.getLogger("clip_med.inference.access")

TOKEN_ENV = "CLIP_MED_SERVE_TOKEN"
COOKIE = "clip_med_session"
PAGE_HEADER = b"x-clip-med"
LOGIN_PATH = "/auth/login"
MIN_TOKEN_CHARS = 16
MAX_LOGIN_BYTES = 4096


@dataclass
class AuthConfig:
    # A shared secret required on every request (Bearer header or the page's cookie). None: read
    # CLIP_MED_SERVE_TOKEN; still none: no check, allowed only when binding a loopback address.
    token: Optional[str] = None


def resolve_token(cfg: AuthConfig | None) -> str | None:
    token = (cfg.token if cfg is not None else None) or os.environ.get(TOKEN_ENV) or None
    if token is not None:
        token = token.strip()
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"the access token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                             "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback address without a token (one line, for the command's error)."""
    if token is None and not is_loopback(host):
        raise ValueError(f"host={host} would expose the service beyond this machine without an access token: set "
                         f"{TOKEN_ENV}=<secret> (or auth.token=<secret>), or bind host=127.0.0.1")


def session_value(token: str) -> str:
    """The cookie's value: a keyed hash of the token (the cookie never holds the token itself)."""
    return hmac.new(token.encode(), b"clip_med page session", hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def _cookies(header: bytes) -> dict[str, str]:
    found = {}
    for part in header.decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            found[name] = value
    return found


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clip_med: access token</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><h1>clip_med</h1><p>This service needs its access token.</p>{message}
<form method="post" action="/auth/login"><label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<button id="login" type="submit">Open</button></form></body></html>
"""


def login_page(message: str = "") -> bytes:
    shown = f'<p class="error" id="login-error" role="alert">{html.escape(message)}</p>' if message else ""
    return LOGIN_PAGE.format(message=shown).encode()


SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY")]
PAGE_CSP = (b"default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
            b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
PAGE_PATHS = ("/", "/static/", LOGIN_PATH)


class AccessGuard:
    """ASGI middleware: the token check (when a token is set), security headers and a privacy-safe access log."""

    def __init__(self, app, token: str | None = None):
        self.app, self.token = app, token
        self.session = session_value(token) if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]
        path, method = scope.get("path", ""), scope.get("method", "GET")
        page = path == "/" or path.startswith(PAGE_PATHS[1:])

        async def with_headers(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers") or [])
                headers += SECURITY_HEADERS
                if page:
                    headers.append((b"content-security-policy", PAGE_CSP))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if self.token is None:
                return await self.app(scope, receive, with_headers)
            if path == LOGIN_PATH and method == "POST":
                return await self._login(scope, receive, with_headers)
            problem = self._problem(scope)
            if problem is None:
                return await self.app(scope, receive, with_headers)
            return await self._refuse(scope, problem, with_headers)
        finally:
            # never the query string or the body: search texts and uploads stay out of the log
            log.info("%s %s %d %.0f ms", method, path, status[0], (time.perf_counter() - start) * 1000)

    def _problem(self, scope) -> str | None:
        assert self.token is not None and self.session is not None
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if authorization:
            scheme, _, given = authorization.partition(" ")
            if scheme.lower() == "bearer" and _same(given.strip(), self.token):
                return None
            return "the access token in the Authorization header is wrong"
        cookie = _cookies(headers.get(b"cookie", b"")).get(COOKIE)
        if cookie is not None:
            if not _same(cookie, self.session):
                return "the page's session is not valid for this service (its token changed?): log in again"
            if scope.get("method") not in ("GET", "HEAD") and headers.get(PAGE_HEADER) != b"page":
                return "requests from the page must carry the X-Clip-Med: page header"
            return None
        return "this service needs an access token: send Authorization: Bearer <token>"

    async def _refuse(self, scope, problem: str, send) -> None:
        headers = dict(scope.get("headers") or [])
        wants_page = scope.get("method") == "GET" and b"text/html" in headers.get(b"accept", b"")
        if wants_page:
            body, kind = login_page(), b"text/html; charset=utf-8"
        else:
            body, kind = json.dumps({"detail": problem}).encode(), b"application/json"
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="clip_med"'), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})

    async def _login(self, scope, receive, send) -> None:
        assert self.token is not None and self.session is not None
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_LOGIN_BYTES:
                return await self._answer(send, 413, login_page("That is far longer than a token."))
            if not message.get("more_body"):
                break
        given = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0].strip()
        if not _same(given, self.token):
            return await self._answer(send, 401, login_page("That token is not this service's token."))
        cookie = f"{COOKIE}={self.session}; HttpOnly; SameSite=Strict; Path=/"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()), (b"content-length", b"0"),
                                (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _answer(send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/html; charset=utf-8"),
                                (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})
