# -*- test-case-name: tests.test_listen -*-
"""
The C{--listen} value: llama-swap's address forms, the check that the address
is free before twistd daemonizes, and the line that says where we listen.

C{--listen} takes a Twisted endpoint string (C{tcp:8080:interface=127.0.0.1},
C{unix:/run/llamaswap.sock}, C{systemd:domain=INET:index=0}). llama-swap's
C{--listen} takes Go's C{host:port} instead, so L{translate} accepts that too:

  - C{:8080} is every IPv4 interface, as llama-swap's C{:8080} is every
    interface: C{tcp:8080:interface=0.0.0.0};
  - C{127.0.0.1:8080} and C{localhost:8080}: C{tcp:8080:interface=<host>};
  - C{[::1]:8080}: C{tcp6:8080:interface=\\:\\:1}.

A string that names a Twisted endpoint type (C{tcp:8080}) is never
translated. Everything here raises L{ListenError} with one line for people.

twistd binds the port after it has forked into a daemon, and tells the
launching terminal at most 100 bytes of what went wrong; L{check_free} binds
(and closes) the same address from C{makeService}, before the fork, so a
taken port is reported there in full.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import getPlugins

from llamaswap._twisted import tcp_server_address

# Go's host:port: an optional host (a name, an IPv4 address or a bracketed IPv6
# address), then a port number.
_HOST_PORT = re.compile(r"(?P<host>\[(?P<v6>[0-9A-Fa-f:.%\w]*)\]|[\w.-]*):(?P<port>\d+)")
# Twisted's own server endpoint types; plugins add more (tcp6, systemd, ...).
_BUILTIN_TYPES = frozenset({"tcp", "unix", "ssl"})
ALL_INTERFACES = "0.0.0.0"


class ListenError(Exception):
    """We cannot listen where asked; C{str()} is one line for the user."""


def translate(listen: str) -> str:
    """
    The Twisted endpoint string for C{listen} (see the module docstring).

    @raise ListenError: for forms that are neither, with the form to use.
    """
    text = listen.strip()
    if text.isdigit():
        raise ListenError(
            f"--listen {listen}: a port alone is ambiguous: use "
            f"tcp:{text}:interface=127.0.0.1 (this host only) or :{text} (all interfaces)"
        )
    if text.startswith(("http://", "https://")):
        address = text.split("://", 1)[1].rstrip("/")
        raise ListenError(f"--listen {listen}: give the address without http://, e.g. {address}")
    match = _HOST_PORT.fullmatch(text)
    if match is None or match["host"].lower() in _endpoint_types():
        return listen
    port = int(match["port"])
    if port > 65535:
        raise ListenError(f"--listen {listen}: port {port} is out of range (0-65535)")
    if match["v6"] is not None:
        interface = match["v6"] or "::"
        return f"tcp6:{port}:interface={_quote(interface)}"
    return f"tcp:{port}:interface={match['host'] or ALL_INTERFACES}"


def _endpoint_types() -> frozenset[str]:
    """The endpoint type names Twisted knows here (lower case), plugins included."""
    plugins = getPlugins(IStreamServerEndpointStringParser)
    return _BUILTIN_TYPES | {str(plugin.prefix).lower() for plugin in plugins}


def bad_endpoint(listen: str, error: Exception) -> str:
    """The one line for an endpoint string Twisted could not parse."""
    reason = str(error) or type(error).__name__
    if listen.startswith("systemd:"):
        return (
            f"--listen {listen}: {reason} (no socket passed: LISTEN_FDS, LISTEN_PID and "
            "LISTEN_FDNAMES must be set)"
        )
    return (
        f"--listen {listen}: {reason} (expected a Twisted endpoint such as "
        "tcp:8080:interface=127.0.0.1, or host:port as in llama-swap)"
    )


def check_free(endpoint: Any) -> None:
    """
    Bind, then close, the TCP address C{endpoint} will listen on, the way its
    port will (C{SO_REUSEADDR}), so what would fail there fails here, with a
    line saying what to do. Other endpoints (UNIX sockets, systemd's) and port
    0 are not checked.

    @raise ListenError: the address is taken, not ours, or not allowed.
    """
    address = tcp_server_address(endpoint)
    if address is None or address[1] == 0:
        return
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ListenError(cannot_listen(host, port, e, hint=True)) from e


def cannot_listen(host: str, port: int, error: BaseException | None, *, hint: bool) -> str:
    """
    C{cannot listen on HOST:PORT: REASON}, and with C{hint} what to do about it.

    Without C{hint} the line stays short enough for twistd's 100-byte report
    from a daemon that failed to bind (see L{HTTPService}).
    """
    shown = host or ALL_INTERFACES
    where = f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"
    code = getattr(error, "errno", None)
    if code == errno.EADDRINUSE:
        reason = "address already in use"
        if hint:
            other = _endpoint_for(shown, "PORT")
            reason += f" (is another llamaswap running? choose another port with --listen {other})"
    elif code == errno.EACCES:
        reason = "permission denied"
        if hint and port < 1024:
            reason += (
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE: use a port above 1023, "
                "or systemd socket activation, docs/deployment.md)"
            )
    elif code == errno.EADDRNOTAVAIL:
        reason = "address not available"
        if hint:
            reason += f" (no network interface of this host has the address {shown})"
    elif isinstance(error, socket.gaierror):
        reason = f"unknown host {shown!r}"
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror[:1].lower() + error.strerror[1:]
    else:
        reason = str(error)
    return f"cannot listen on {where}: {reason}"


def _endpoint_for(host: str, port: str) -> str:
    if ":" in host:
        return f"tcp6:{port}:interface={_quote(host)}"
    return f"tcp:{port}:interface={host}"


def _quote(argument: str) -> str:
    """C{argument} with its colons escaped, for an endpoint string."""
    quoted: str = quoteStringArgument(argument)  # type: ignore[no-untyped-call]
    return quoted


def listening_line(address: object) -> str:
    """
    Where people reach the proxy bound to C{address}: its URL and the UI's,
    e.g. C{http://127.0.0.1:8080 (UI: http://127.0.0.1:8080/ui/)}.
    """
    if isinstance(address, IPv4Address | IPv6Address):
        host = str(address.host)
        try:
            unspecified = ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
        except ValueError:
            unspecified = False
        url = _url(host, address.port)
        if unspecified:
            local = _url("::1" if ":" in host else "127.0.0.1", address.port)
            return f"{url}, all interfaces (UI: {local}/ui/)"
        return f"{url} (UI: {url}/ui/)"
    if isinstance(address, UNIXAddress):
        name = address.name
        return f"unix:{os.fsdecode(name) if name is not None else '(unnamed socket)'}"
    return str(address)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
