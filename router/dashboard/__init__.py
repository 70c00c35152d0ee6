"""The live dashboard at ``/dashboard`` (admin key): fleet state, rates, failovers.

``handler.Dashboard`` serves the page and its data (JSON and server-sent
events); ``stats.StatsSampler`` derives per-instance request rate, error
rate and p99 from the Prometheus metrics once a second, off the hot path.
The page is ``static/dashboard.html``: one file, inline CSS and JS, no build.
"""

from router.dashboard.handler import COOKIE, PREFIX, Dashboard
from router.dashboard.stats import StatsSampler

__all__ = ["COOKIE", "PREFIX", "Dashboard", "StatsSampler"]
