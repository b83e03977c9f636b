"""
Test doubles that ship with llamaswap, the way C{treq.testing} ships its own:
the fake OpenAI/Anthropic upstream (L{llamaswap.testing.fakeserver}, also a
program), fakes of processes and a reactor that spawns them
(L{llamaswap.testing.process}), fakes of the web layer's collaborators
(L{llamaswap.testing.web}), and a fake GPU for memory admission: a folder fake
servers allocate on (L{llamaswap.testing.fake_gpu}), the C{nvidia-smi} that
reads it (L{llamaswap.testing.nvidia_smi}) and a fake probe for unit tests
(L{llamaswap.testing.memory}).

Nothing here is imported by the proxy itself, and this package imports none of
its modules on import: the fake server starts in a fraction of the proxy's time.
"""
