# -*- test-case-name: tests.test_tap -*-
# The twistd plugin. Lazy: llamaswap.tap is imported only when the subcommand runs.
# No __init__.py may exist in twisted/ or twisted/plugins/ (it would shadow Twisted's own).
from twisted.application.service import ServiceMaker

llamaswap = ServiceMaker(
    "llamaswap", "llamaswap.tap", "Hot-swapping proxy for local LLM inference servers.", "llamaswap"
)
