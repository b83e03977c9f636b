# -*- test-case-name: tests.test_tap -*-
"""llamaswap: a hot-swapping proxy for local LLM inference servers."""

__version__ = "0.1.0"
