"""Who may use the web server: page origins, the bearer token, TLS, and what a bind exposes.

Three separate guards, because they stop different people:

- **Origin**: a browser lets any web site open a WebSocket to ``localhost`` and POST a
  form there, but it always says which page asked (``Origin``). Only the server's own
  page (same host and port) and the origins listed in ``server.allowed_origins`` pass;
  clients that are not browsers send no ``Origin`` and are left to the token.
- **Token**: with ``server.token`` (or the ``MINDMIRROR_TOKEN`` environment variable) set,
  ``/ws``, ``/metrics``, ``/trace`` and the model actions need it, as
  ``Authorization: Bearer <token>`` or ``?token=<token>`` (a browser cannot put headers
  on a WebSocket, so the page passes it in the query). The pages themselves and
  ``/health`` stay public: they hold nothing, and a load balancer must probe health.
  Tokens are compared in constant time and never logged (``redact``).
- **TLS**: browsers grant the camera and microphone only to https pages (or localhost),
  so a remote browser needs ``server.tls_cert``/``server.tls_key``: the same port then
  serves HTTPS and WSS.

Binding an address other than loopback without a token is allowed (a trusted LAN) but
logged as a warning at start (``exposure_warnings``).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from websockets.http11 import Request

from core.config import ConfigError

TOKEN_ENV = "MINDMIRROR_TOKEN"
"""Environment variable read for the token when ``server.token`` is not set."""
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{16,256}")
"""What a token may be: URL-safe as it is (it travels in a query string), and long enough
not to be guessed. ``python -c "import secrets; print(secrets.token_urlsafe(24))"`` makes one."""
TOKEN_RULE = ("16..256 characters of A-Z a-z 0-9 . _ ~ - "
              "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
TOKEN_PARAM = "token"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def check_token(token: str) -> str | None:
    """Why ``token`` cannot be used, or None when it can."""
    if TOKEN_PATTERN.fullmatch(token):
        return None
    return f"must be {TOKEN_RULE}; got {len(token)} characters" + (
        "" if re.fullmatch(r"[A-Za-z0-9._~-]*", token) else " including others")


def resolve_token(configured: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token in force: ``server.token`` (already checked), else ``MINDMIRROR_TOKEN``;
    None when neither is set. A bad environment value raises ``ConfigError`` naming it."""
    if configured is not None:
        return configured
    value = environ.get(TOKEN_ENV, "")
    if not value:
        return None
    problem = check_token(value)
    if problem is not None:
        raise ConfigError(problem, TOKEN_ENV)
    return value


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` lowercased with the scheme's default port dropped, so
    ``https://Mirror.example:443`` and ``https://mirror.example`` compare equal; None when
    ``origin`` is not an http(s) origin (a path, a query, ``null``, garbage)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


def header(request: Request, name: str) -> str | None:
    """The one value of header ``name``; None when absent, and "" when sent more than once
    (which no browser does: a request that tries is judged as if the value were empty)."""
    values = request.headers.get_all(name)
    return values[0] if len(values) == 1 else (None if not values else "")


def request_token(request: Request) -> str | None:
    """The token a request carries: ``Authorization: Bearer ...`` first, else ``?token=``."""
    authorization = header(request, "Authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    try:
        query = urlsplit(request.path).query
    except ValueError:
        return None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == TOKEN_PARAM:
            return value
    return None


def redact(path: str) -> str:
    """``path`` with any token in its query replaced, for logs."""
    try:
        parts = urlsplit(path)
    except ValueError:
        return "<unparsable path>"
    if not parts.query:
        return path
    query = [(k, "<redacted>" if k == TOKEN_PARAM else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="<>")))


class AccessPolicy:
    """The origin and token checks of one server; pure, so tests need no socket."""

    def __init__(self, *, token: str | None, allowed_origins: Sequence[str] = (),
                 allow_cross_origin: bool = False) -> None:
        self._token = token.encode() if token is not None else None
        self._origins = frozenset(o for o in map(normalize_origin, allowed_origins) if o is not None)
        self._any_origin = allow_cross_origin

    @property
    def token_required(self) -> bool:
        return self._token is not None

    def origin_allowed(self, request: Request) -> bool:
        """No ``Origin`` (not a browser), the page's own host, or a listed origin."""
        origin = header(request, "Origin")
        if origin is None or self._any_origin:
            return True
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:  # e.g. "http://[": not an origin at all
            return False
        if netloc and netloc == (header(request, "Host") or "").lower():
            return True
        normal = normalize_origin(origin)
        return normal is not None and normal in self._origins

    def authorized(self, request: Request) -> bool:
        """True without a token in force; else whether the request carries it."""
        if self._token is None:
            return True
        given = request_token(request)
        # compare_digest takes as long for a wrong first byte as for a wrong last one.
        return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._token)

    def refusal(self, request: Request) -> str:
        """Why ``authorized`` said no, for the 401's body (never echoing the token)."""
        if request_token(request) is None:
            return ("this server needs its token: open the page as /?token=<token>, or send "
                    "'Authorization: Bearer <token>'")
        return "the token is wrong"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def exposure_warnings(host: str, *, token: bool, tls: bool) -> list[str]:
    """What to tell the operator about binding ``host`` (nothing for loopback)."""
    if is_loopback(host):
        return []
    warnings = []
    if not token:
        warnings.append(f"listening on {host} without a token: anyone who can reach this address can "
                        f"drive the pipeline and read /metrics; set server.token or {TOKEN_ENV}")
    if not tls:
        warnings.append(f"listening on {host} without TLS: browsers on other machines allow the camera and "
                        f"microphone only on https pages; pass --tls-cert/--tls-key (server.tls_cert/tls_key)")
    return warnings


def page_url(url: str, token: str | None) -> str:
    """The page's address with the token in its query, as the page reads it."""
    return url if token is None else f"{url}?{TOKEN_PARAM}={quote(token, safe='')}"


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; decrypt it first (openssl pkey -in KEY -out PLAIN)")


def server_ssl_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS 1.2+ server context holding ``cert`` (PEM, the chain) and ``key`` (PEM, not
    encrypted: nobody is there to type a passphrase). Raises ``ssl.SSLError``, ``OSError``
    or ``ValueError`` for files that cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(os.fspath(cert), os.fspath(key), password=_no_password)
    return context


def tls_problem(cert: str, key: str) -> tuple[str, str] | None:
    """``(field, reason)`` when ``cert`` and ``key`` cannot serve TLS, else None; checked
    when the config loads, so a typo fails at start, not at a browser's first connection."""
    for name, what, path in (("tls_cert", "certificate", cert), ("tls_key", "key", key)):
        if not os.path.isfile(path):
            return name, f"no {what} file {path!r}"
        if not os.access(path, os.R_OK):
            return name, f"{what} file {path!r} cannot be read by this user"
    try:
        server_ssl_context(cert, key)
    except (ssl.SSLError, OSError, ValueError) as e:
        return "tls_cert", f"{cert!r} and {key!r} are not a PEM certificate and its key: {e}"
    return None
