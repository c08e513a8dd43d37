"""The root of every driver error.

``drivers/`` never imports ``agent/``, so driver errors cannot derive from
``agent.errors.AgentError``; they share this root instead, and the agent maps
a ``DriverError`` once, where it builds or calls a driver (the device id goes
into the message there).
"""

from __future__ import annotations


class DriverError(Exception):
    """Root of scanner, printer and sensor driver errors."""
