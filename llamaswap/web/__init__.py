"""The HTTP side of llamaswap: the site, the resource tree, the relay and its streams.

Everything here depends on the core (supervisor, logs, metrics, config) and nothing in the
core depends on it; docs/architecture.md draws the layering and tests/test_architecture.py
checks it.
"""
