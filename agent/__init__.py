"""edge-agent daemon core."""

__version__ = "0.1.0"
