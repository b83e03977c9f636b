"""One model server's lifecycle (moved from C{llamaswap/process.py}; split up next)."""

from llamaswap.process.model import *  # noqa: F403
from llamaswap.process.model import _ChildProtocol  # noqa: F401
