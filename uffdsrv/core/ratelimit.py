"""Rate limits with no I/O: how many log lines a hostile peer can cause.

A peer that sends malformed messages as fast as it can would otherwise
write a warning per message; the limiter lets a burst through per period
and reports, with the next line it lets through, how many it held back.
The clock is a parameter, so the rule is tested without waiting.
"""
import time


class LogLimit:
    """At most `burst` lines per `period` seconds; allow() -> how many were
    held back since the last line let through, or None to hold this one
    back too."""

    def __init__(self, burst: int = 20, period: float = 1.0, clock=time.monotonic):
        self.burst, self.period, self.clock = burst, period, clock
        self.start, self.count, self.held = clock(), 0, 0

    def allow(self) -> int | None:
        now = self.clock()
        if now - self.start >= self.period:
            self.start, self.count = now, 0
        if self.count >= self.burst:
            self.held += 1
            return None
        self.count += 1
        held, self.held = self.held, 0
        return held
