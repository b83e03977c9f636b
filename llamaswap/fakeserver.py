# -*- test-case-name: tests.test_fakeserver -*-
"""C{python -m llamaswap.fakeserver}: the fake upstream, now L{llamaswap.testing.fakeserver}."""

import sys

from llamaswap.testing.fakeserver.run import main

if __name__ == "__main__":
    sys.exit(main())
