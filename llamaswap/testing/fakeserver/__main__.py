# -*- test-case-name: tests.test_fakeserver -*-
"""C{python -m llamaswap.testing.fakeserver}: run the fake upstream (see the package docstring)."""

import sys

from llamaswap.testing.fakeserver.run import main

sys.exit(main())
