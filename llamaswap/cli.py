# -*- test-case-name: tests.test_tap -*-
"""
C{llamaswap} console script: C{twistd -n llamaswap ...} for people who do not
know twistd. C{llamaswap --config c.yaml [--listen ...]}; any argument is passed
on to the llamaswap subcommand. C{llamaswap haproxy-config HOST...} writes the
HAProxy front of several hosts instead (L{llamaswap.scaleout}).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from twisted.scripts.twistd import run

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["haproxy-config"]:
        from llamaswap.scaleout.command import main as haproxy_config

        sys.exit(haproxy_config(args[1:]))
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "llamaswap", *args]
    run()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
