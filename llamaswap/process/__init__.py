"""
One model server's lifecycle, on one screen per concern.

 - L{states}: the L{State} enum and the one transition table.
 - L{model}: L{ModelProcess}, the policy: it moves by the table and nothing
   else assigns its state.
 - L{health}: L{HealthPoller<health.HealthPoller>}, the port check and health
   polling of one start.
 - L{child}: L{Child<child.Child>}, one spawned server: signals to its process
   group, C{cmdStop}, SIGKILL after the grace, pipes held too long.
 - L{spawn}: the command lines (through the exec wrapper, C{cmdStop}).
 - L{_session}: the exec wrapper (a script: setsid, parent-death signal, group guard).
 - L{lines}: child output as bounded text lines.
 - L{waiting}: L{Waiters<waiting.Waiters>} (one Deferred per waiter) and
   L{Timers<waiting.Timers>}.
"""

from llamaswap.process.model import ModelProcess
from llamaswap.process.states import State

__all__ = ["ModelProcess", "State"]
