"""The root of every driver error.

``drivers/`` never imports ``agent/``, so driver errors cannot derive from
``agent.errors.AgentError``; they share this root instead. Each device family
(``agent/devices/``) catches its drivers' errors where it builds or calls a
driver, in ``config_issues`` (as config issues naming the key) and in
``start`` (as the device's problem in status), and names the device there.
"""

from __future__ import annotations


class DriverError(Exception):
    """Root of scanner, printer and sensor driver errors."""
