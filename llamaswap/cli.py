# -*- test-case-name: tests.test_tap -*-
"""
C{llamaswap} console script: C{twistd -n --pidfile= llamaswap ...} for people who
do not know twistd. C{llamaswap --config c.yaml [--listen ...]}; any argument is
passed on to the llamaswap subcommand. With no arguments, or C{--help}, it shows
its own usage rather than twistd's. C{llamaswap haproxy-config HOST...} writes
the HAProxy front of several hosts instead (L{llamaswap.scaleout}).
"""

from __future__ import annotations

import sys

USAGE_HEAD = """\
Usage: llamaswap --config PATH [--listen ENDPOINT]

Runs the llamaswap proxy in the foreground, logging to stdout; Ctrl-C stops it
and every model server it started. The same as
  twistd -n --pidfile= llamaswap --config PATH [--listen ENDPOINT]
Run twistd itself for a log file, a pidfile or daemon mode (docs/deployment.md).
"""


def usage() -> str:
    """Our usage text: the head above, then the options as twistd lists them."""
    from llamaswap.tap import Options

    return USAGE_HEAD + "\n" + Options().getUsage()  # type: ignore[no-untyped-call]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["haproxy-config"]:
        from llamaswap.scaleout.command import main as haproxy_config

        sys.exit(haproxy_config(args[1:]))
    if not args:
        sys.stderr.write(usage())
        sys.exit(2)
    if "--help" in args or "-h" in args:
        sys.stdout.write(usage())
        sys.exit(0)

    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "llamaswap", *args]
    try:
        run()  # type: ignore[no-untyped-call]
    except OSError as e:
        # twistd's own start-up (before our plugin could check it): one line, not a traceback.
        where = f"{e.filename}: " if e.filename else ""
        sys.exit(f"llamaswap: {where}{e.strerror or e}")


if __name__ == "__main__":
    main()
