# -*- test-case-name: tests.test_listen -*-
"""
Tests for L{llamaswap.listen}: llama-swap's C{--listen} forms, the check that
the address is free (before twistd daemonizes), and the listening line.
"""

from __future__ import annotations

import errno
import socket

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.listen import (
    ListenError,
    cannot_listen,
    check_free,
    listening_line,
    translate,
)

# twistd tells a daemon's launching terminal the first 100 bytes of "1 <exception line>".
TWISTD_REPORT = 100


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A socket listening on a free port of C{host}; closed by the caller's cleanup."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    return sock


class TranslateTests(SynchronousTestCase):
    """C{--listen} in llama-swap's form becomes the Twisted endpoint it means."""

    def test_llama_swap_forms(self) -> None:
        """:port is every IPv4 interface; host:port and [v6]:port bind that host."""
        cases = {
            ":8080": "tcp:8080:interface=0.0.0.0",
            "127.0.0.1:8080": "tcp:8080:interface=127.0.0.1",
            "0.0.0.0:9000": "tcp:9000:interface=0.0.0.0",
            "localhost:8080": "tcp:8080:interface=localhost",
            "[::1]:8080": "tcp6:8080:interface=\\:\\:1",
            "[::]:8080": "tcp6:8080:interface=\\:\\:",
            " :8080 ": "tcp:8080:interface=0.0.0.0",
        }
        for given, endpoint in cases.items():
            self.assertEqual(translate(given), endpoint, given)

    def test_translated_strings_parse(self) -> None:
        """What translate() makes is an endpoint Twisted parses to that address."""
        reactor = MemoryReactor()
        for given in (":8080", "127.0.0.1:8080", "[::1]:8080"):
            serverFromString(reactor, translate(given)).listen(None)  # type: ignore[no-untyped-call]
        self.assertEqual(
            [(port, interface) for port, _, _, interface in reactor.tcpServers],
            [(8080, "0.0.0.0"), (8080, "127.0.0.1"), (8080, "::1")],
        )

    def test_twisted_endpoints_are_kept(self) -> None:
        """A string naming a Twisted endpoint type is never read as host:port."""
        for given in (
            "tcp:8080",
            "tcp:8080:interface=127.0.0.1",
            "unix:8080",
            "tcp6:8080",
            "systemd:domain=INET:index=0",
            "unix:/run/llamaswap.sock",
        ):
            self.assertEqual(translate(given), given)

    def test_forms_answered_with_the_form_to_use(self) -> None:
        """A bare port or a URL is refused with the exact strings that would work."""
        cases = {
            "8080": "--listen 8080: a port alone is ambiguous: use "
            "tcp:8080:interface=127.0.0.1 (this host only) or :8080 (all interfaces)",
            "http://127.0.0.1:8080/": "--listen http://127.0.0.1:8080/: give the address "
            "without http://, e.g. 127.0.0.1:8080",
            ":70000": "--listen :70000: port 70000 is out of range (0-65535)",
        }
        for given, message in cases.items():
            error = self.assertRaises(ListenError, translate, given)
            self.assertEqual(str(error), message)


class CheckFreeTests(SynchronousTestCase):
    """check_free() fails where listening would, with a line saying what to do."""

    def endpoint(self, description: str) -> object:
        return serverFromString(MemoryReactor(), description)  # type: ignore[no-untyped-call]

    def test_port_in_use(self) -> None:
        """A port another socket listens on: its address and what to do about it."""
        taken = listening_socket()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        error = self.assertRaises(
            ListenError, check_free, self.endpoint(f"tcp:{port}:interface=127.0.0.1")
        )
        self.assertEqual(
            str(error),
            f"cannot listen on 127.0.0.1:{port}: address already in use (is another llamaswap "
            "running? choose another port with --listen tcp:PORT:interface=127.0.0.1)",
        )

    def test_port_in_use_on_every_interface(self) -> None:
        """Taken on 127.0.0.1 is taken for 0.0.0.0 too, and the hint keeps 0.0.0.0."""
        taken = listening_socket()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        error = self.assertRaises(ListenError, check_free, self.endpoint(translate(f":{port}")))
        self.assertIn(f"cannot listen on 0.0.0.0:{port}: address already in use", str(error))
        self.assertIn("--listen tcp:PORT:interface=0.0.0.0)", str(error))

    def test_free_port_is_left_free(self) -> None:
        """A free port passes, and the check does not keep it."""
        probe = listening_socket()
        port = probe.getsockname()[1]
        probe.close()
        check_free(self.endpoint(f"tcp:{port}:interface=127.0.0.1"))
        again = socket.socket()
        self.addCleanup(again.close)
        again.bind(("127.0.0.1", port))

    def test_address_not_here(self) -> None:
        """An address no interface has (TEST-NET-1) says so."""
        error = self.assertRaises(
            ListenError, check_free, self.endpoint("tcp:8080:interface=192.0.2.1")
        )
        self.assertEqual(
            str(error),
            "cannot listen on 192.0.2.1:8080: address not available (no network interface "
            "of this host has the address 192.0.2.1)",
        )

    def test_unchecked_endpoints(self) -> None:
        """Port 0, UNIX sockets and anything not TCP are left to the real listen."""
        check_free(self.endpoint("tcp:0:interface=127.0.0.1"))
        check_free(self.endpoint("unix:/nonexistent/x.sock"))
        check_free(object())

    def test_other_reasons(self) -> None:
        """A privileged port, an unknown host and anything else: why, and what to do."""
        denied = OSError(errno.EACCES, "Permission denied")
        self.assertEqual(
            cannot_listen("0.0.0.0", 80, denied, hint=True),
            "cannot listen on 0.0.0.0:80: permission denied (ports below 1024 need root or "
            "CAP_NET_BIND_SERVICE: use a port above 1023, or systemd socket activation, "
            "docs/deployment.md)",
        )
        self.assertEqual(
            cannot_listen("0.0.0.0", 8080, denied, hint=True),
            "cannot listen on 0.0.0.0:8080: permission denied",
        )
        unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        self.assertEqual(
            cannot_listen("nosuch.invalid", 8080, unknown, hint=True),
            "cannot listen on nosuch.invalid:8080: unknown host 'nosuch.invalid'",
        )
        other = OSError(errno.EMFILE, "Too many open files")
        self.assertEqual(
            cannot_listen("::1", 8080, other, hint=True),
            "cannot listen on [::1]:8080: too many open files",
        )
        self.assertEqual(
            cannot_listen("::1", 8080, OSError(errno.EADDRINUSE, "x"), hint=True),
            "cannot listen on [::1]:8080: address already in use (is another llamaswap "
            "running? choose another port with --listen tcp6:PORT:interface=\\:\\:1)",
        )

    def test_short_form_fits_twistd_report(self) -> None:
        """
        Without the hint (a daemon that lost the port after the check), the
        line fits in what twistd passes on to the launching terminal.
        """
        error = OSError(errno.EADDRINUSE, "Address already in use")
        line = cannot_listen("255.255.255.255", 65535, error, hint=False)
        self.assertEqual(line, "cannot listen on 255.255.255.255:65535: address already in use")
        report = f"1 llamaswap.listen.ListenError: {line}"
        self.assertLessEqual(len(report.encode()), TWISTD_REPORT)


class ListeningLineTests(SynchronousTestCase):
    """The line people read at start: where the proxy and its UI are."""

    def test_lines(self) -> None:
        """A URL and the UI's; on every interface, the UI on this host."""
        cases = [
            (
                IPv4Address("TCP", "127.0.0.1", 8080),
                "http://127.0.0.1:8080 (UI: http://127.0.0.1:8080/ui/)",
            ),
            (
                IPv4Address("TCP", "0.0.0.0", 8080),
                "http://0.0.0.0:8080, all interfaces (UI: http://127.0.0.1:8080/ui/)",
            ),
            (IPv6Address("TCP", "::1", 8080), "http://[::1]:8080 (UI: http://[::1]:8080/ui/)"),
            (
                IPv6Address("TCP", "::", 8080),
                "http://[::]:8080, all interfaces (UI: http://[::1]:8080/ui/)",
            ),
            (UNIXAddress(b"/run/llamaswap.sock"), "unix:/run/llamaswap.sock"),
        ]
        for address, line in cases:
            self.assertEqual(listening_line(address), line)
