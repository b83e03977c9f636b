# -*- test-case-name: tests.test_security -*-
"""
Who may do what (docs/deployment.md, "Security"; docs/api.md, "API keys").

Every request passes, in this order: the C{Host} check (a name we answer to:
localhost names, IP addresses, C{security.allowedHosts}: what stops DNS
rebinding), the browser-origin check (a page on another origin may not drive
the proxy unless C{security.allowedOrigins} says so; requests without an
C{Origin}, from curl, SDKs and agents, are not browsers' and pass), then the
API key and the route's access level. A refused request causes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import socket
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

from attrs import frozen
from twisted.web.server import Request

from llamaswap.config import Config
from llamaswap.config.schema import ACCESS_LEVELS, ApiKey
from llamaswap.errors import Forbidden, Unauthorized
from llamaswap.names import PeerTarget, Target

# The first path segment -> the access a key needs for it (others: "inference").
OPEN_SEGMENTS = frozenset({b"", b"health", b"favicon.ico"})
ROUTE_ACCESS = {
    b"running": "read",
    b"ui": "admin",
    b"api": "admin",
    b"logs": "admin",
    b"metrics": "admin",
    b"unload": "admin",
}
# What a browser says about where a request comes from (Fetch Metadata): only these
# two are our own pages or the user's own doing (a bookmark, the address bar).
OWN_FETCH_SITES = frozenset({b"same-origin", b"none"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


@frozen
class Client:
    """Who sent a request: its key (None: no keys are configured) and its address."""

    key: ApiKey | None
    address: str | None  # the peer's IP address, None for a UNIX socket

    @property
    def loopback(self) -> bool:
        """Whether it comes from this machine (only asked when showing commands)."""
        if self.address is None:
            return False
        try:
            return ipaddress.ip_address(self.address).is_loopback
        except ValueError:
            return False

    @property
    def access(self) -> str:
        return "admin" if self.key is None else self.key.access

    def may(self, level: str) -> bool:
        return ACCESS_LEVELS.index(self.access) >= ACCESS_LEVELS.index(level)

    def may_use(self, *names: str) -> bool:
        """Whether the key's C{models} globs cover one of C{names} (an id, alias, peer model)."""
        if self.key is None:
            return True
        return any(fnmatchcase(n, glob) for n in names for glob in self.key.models)

    @property
    def may_load(self) -> bool:
        return self.key is None or self.key.load

    @property
    def sees_secrets(self) -> bool:
        """Commands (they may hold tokens and paths): admin keys, or local clients without keys."""
        return self.loopback if self.key is None else self.access == "admin"


def authorize_model(client: Client, target: Target, loaded: bool) -> None:
    """
    @raise Forbidden: C{client}'s key does not cover C{target}'s model, or may
        not load it and it is not loaded.
    """
    if isinstance(target, PeerTarget):
        if not client.may_use(target.fqn):
            raise Forbidden(f"this API key may not use model {target.fqn}")
        return  # a peer's loading is its own business
    if not client.may_use(target.model_id, target.requested):
        raise Forbidden(f"this API key may not use model {target.requested}")
    if not client.may_load and not loaded:
        raise Forbidden(
            f"model {target.requested} is not loaded, and this API key may not load models"
        )


def _host_name(host: bytes) -> str:
    """The name in a C{Host} header, without the port (IPv6 in brackets kept bare)."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def presented_keys(request: Request) -> list[str]:
    """API keys the client presented: Basic password, Bearer token, C{x-api-key}."""
    keys = []
    for value in request.requestHeaders.getRawHeaders(b"authorization", []):
        scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                continue
            keys.append(decoded.partition(":")[2])
        elif scheme.lower() == "bearer":
            keys.append(credentials)
    keys.extend(
        v.decode("latin-1").strip() for v in request.requestHeaders.getRawHeaders(b"x-api-key", [])
    )
    return [k for k in keys if k]


class Guard:
    """The checks of one config; a reload builds a new one with the new resource tree."""

    def __init__(self, config: Config, hosts: tuple[str, ...] = ()) -> None:
        """C{hosts}: names answered to besides the config's (the name we listen on)."""
        self._keys = [(k.key.encode("utf-8"), k) for k in config.api_keys]
        security = config.security
        self._hosts = set(security.allowed_hosts) | set(hosts)
        self._any_host = "*" in self._hosts
        # The machine's own name: a LAN client may use it (an attacker's DNS cannot).
        self._hosts.update({socket.gethostname().lower(), "localhost", "127.0.0.1"})
        self._origins = set(security.allowed_origins)
        self._any_origin = "*" in self._origins

    # --- where the request comes from -----------------------------------------

    def host_allowed(self, request: Request) -> bool:
        host = request.getHeader(b"host")
        if host is None or self._any_host:
            return True  # HTTP/1.0 without Host: no name to rebind
        name = _host_name(host)
        if name in self._hosts or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
            return True  # an address is not a name an attacker's DNS can point at us
        except ValueError:
            pass
        return any(fnmatchcase(name, pattern) for pattern in self._hosts if "*" in pattern)

    def cross_origin(self, request: Request) -> tuple[bool, bytes | None]:
        """
        Whether the request may go on, and the origin to name in
        C{Access-Control-Allow-Origin} (a browser's allowed cross-origin request).
        """
        origin = request.getHeader(b"origin")
        site = request.getHeader(b"sec-fetch-site")
        if origin is None:
            # No Origin: not a browser, or a browser's same-origin GET, or a cross-site
            # <img>/link/form GET, which Fetch Metadata still tells apart.
            return (site is None or site in OWN_FETCH_SITES or self._any_origin), None
        if self._own(origin, request.getHeader(b"host")):
            return True, None
        text = origin.decode("latin-1").strip().rstrip("/").lower()
        if self._any_origin or text in self._origins:
            return True, origin
        return False, None

    @staticmethod
    def _own(origin: bytes, host: bytes | None) -> bool:
        """Whether C{origin} is this proxy's own (its UI): the same host and port as C{Host}."""
        if host is None:
            return False
        parts = urlsplit(origin.decode("latin-1").strip().lower())
        try:
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        name = host.decode("latin-1").strip().lower()
        if ":" in name.rsplit("]", 1)[-1]:
            own_host, _, own_port = name.rpartition(":")
        else:
            own_host, own_port = name, str(_DEFAULT_PORTS.get(parts.scheme, 80))
        return parts.hostname == own_host.strip("[]") and str(port) == own_port

    # --- who sent it ------------------------------------------------------------

    def client(self, request: Request) -> Client:
        """
        @raise Unauthorized: keys are configured and the request presents none of them.
        """
        host = getattr(request.getClientAddress(), "host", None)
        address = host if isinstance(host, str) else None
        if not self._keys:
            return Client(None, address)
        for text in presented_keys(request):
            candidate = text.encode("utf-8")
            found = None
            # Compare with every key, in constant time, so timing tells nothing.
            for secret, key in self._keys:
                if hmac.compare_digest(candidate, secret):
                    found = key
            if found is not None:
                return Client(found, address)
        raise Unauthorized("unauthorized: invalid or missing API key")

    @staticmethod
    def needs(segment: bytes) -> str:
        return ROUTE_ACCESS.get(segment, "inference")
