"""
Test doubles that ship with llamaswap, the way C{treq.testing} ships its own:
the fake OpenAI/Anthropic upstream (L{llamaswap.testing.fakeserver}, also a
program), fakes of processes and a reactor that spawns them
(L{llamaswap.testing.process}), and fakes of the web layer's collaborators
(L{llamaswap.testing.web}).

Nothing here is imported by the proxy itself, and this package imports none of
its modules on import: the fake server starts in a fraction of the proxy's time.
"""
