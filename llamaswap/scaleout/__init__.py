"""
Several llamaswap hosts behind one HAProxy (docs/scale-out.md): C{llamaswap
haproxy-config} reads each host's C{/v1/models} (L{inventory}), groups the
model names by the set of hosts that serve them (L{plan}) and writes HAProxy's
configuration (L{haproxy}) and the union model list it answers.
"""
