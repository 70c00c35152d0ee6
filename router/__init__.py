"""wa-session-router: one reliable API in front of a fleet of WhatsApp instances."""

__version__ = "0.1.0"
