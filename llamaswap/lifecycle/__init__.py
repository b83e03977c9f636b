"""
The daemon's life after start-up (docs/deployment.md): reloading the config
(L{watch}: C{--watch-config}; L{signals}: C{SIGHUP}), and stopping gracefully
(L{shutdown}: drain, then stop; a second signal stops at once).
"""
