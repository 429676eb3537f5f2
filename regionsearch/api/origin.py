"""Same-origin check for write routes: the usual defence of a service on localhost.

A browser lets any web page the user visits send a POST to ``http://127.0.0.1:8000`` (a "simple"
multipart request needs no CORS preflight), so without this check any page could write into the
user's index. Browsers always say where such a request comes from (``Origin``, or at least
``Referer``); scripts and curl usually send neither and are let through: they run as the user
already, and ``--api-key`` is what guards against them.

Rules, for requests that name their origin:

* the origin must be the server's own (scheme, host and port as in the ``Host`` header), or one
  of the configured trusted origins (``--cors-origin``);
* ``Origin: null`` (sandboxed frames, ``file://`` pages) is refused;
* on a server listening on a loopback address, ``Host`` must be a loopback name too: a page whose
  DNS name was re-pointed at 127.0.0.1 (DNS rebinding) sends matching ``Origin`` and ``Host``.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, status

DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def _origin_key(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of an origin or URL, lower-cased with the default port filled."""
    try:
        parts = urlsplit(url.strip())
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in DEFAULT_PORTS or not host:
        return None
    return scheme, host.lower(), port or DEFAULT_PORTS[scheme]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address, IPv6 with or without brackets) is loopback."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_same_origin(request: Request, trusted: list[str]) -> None:
    """Raise 403 unless the request comes from the server's own origin, a trusted one or none."""
    claimed = request.headers.get("origin")
    header = "Origin"
    if claimed is None:
        claimed = request.headers.get("referer")
        header = "Referer"
    if claimed is None:
        return  # not sent by a browser page
    origin = _origin_key(claimed)
    if origin is not None and origin in {_origin_key(t) for t in trusted}:
        return
    host_header = request.headers.get("host", "")
    own = _origin_key(f"{request.url.scheme}://{host_header}")
    server = request.scope.get("server") or ("", None)
    if own is not None and is_loopback(str(server[0])) and not is_loopback(own[1]):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"write refused: this server listens on {server[0]} but was addressed as "
            f"{host_header!r} (DNS rebinding?); use http://localhost or the IP address",
        )
    if origin is None or origin != own:
        shown = claimed if len(claimed) <= 100 else claimed[:100] + "..."
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"cross-origin write refused: {header} {shown!r} is not this server's origin; "
            "trust a web page's origin with `serve --cors-origin`",
        )
