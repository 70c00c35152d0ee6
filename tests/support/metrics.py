"""Read a real router's ``/metrics`` as numbers, to assert that metrics move.

The registry is process-wide and other tests in the same process move it
too, so tests compare two scrapes (``Scrape.delta``) rather than reading
absolute values.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# (sample name, sorted label pairs)
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Scrape:
    values: dict[SeriesKey, float]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        values: dict[SeriesKey, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                values[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return cls(values)

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, lbl), v in self.values.items() if n == name and want <= set(lbl))

    def delta(self, before: Scrape, name: str, **labels: str) -> float:
        return self.total(name, **labels) - before.total(name, **labels)

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {lbl: v for (n, lbl), v in self.values.items() if n == name}


async def scrape(http: aiohttp.ClientSession, base_url: str) -> Scrape:
    async with http.get(base_url + "/metrics") as resp:
        assert resp.status == 200, resp.status
        return Scrape.parse(await resp.text())
