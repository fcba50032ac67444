"""The aggregate that the demo job computes over city records.

Both the document generator (for the expected result) and the job (over the
parsed records) use this class, so their outputs compare with `==`. It imports
only the standard library because the job script imports it too.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

TOP_CITY_COUNT = 10


class CityAggregate:
    """Record count, population per country code and the largest cities.

    The largest cities are ordered by population, largest first, and ties are
    broken by the smaller `id`.
    """

    def __init__(self, top_count: int = TOP_CITY_COUNT) -> None:
        self.top_count = top_count
        self.record_count = 0
        self.population_by_country: dict[str, int] = {}

        # Min-heap of (population, -id, sequence, summary) that keeps the
        # `top_count` largest cities. The sequence number stops the comparison
        # before it reaches the dict when a population and id repeat.
        self._top_heap: list[tuple[int, int, int, dict[str, Any]]] = []
        self._sequence = itertools.count()

    def add(self, record: dict[str, Any]) -> None:
        """Add one city record with the keys id, name, countrycode and population."""
        population = int(record["population"])
        country = str(record["countrycode"])
        city_id = int(record["id"])

        self.record_count += 1
        self.population_by_country[country] = self.population_by_country.get(country, 0) + population

        summary = {
            "id": city_id,
            "name": record["name"],
            "countrycode": country,
            "population": population,
        }
        entry = (population, -city_id, next(self._sequence), summary)
        if len(self._top_heap) < self.top_count:
            heapq.heappush(self._top_heap, entry)
        elif entry[:2] > self._top_heap[0][:2]:
            heapq.heapreplace(self._top_heap, entry)

    def to_dict(self) -> dict[str, Any]:
        """Return the aggregate as JSON-compatible data that survives a JSON round trip unchanged."""
        top_entries = sorted(self._top_heap, key=lambda entry: (-entry[0], -entry[1]))
        return {
            "records": self.record_count,
            "population_by_country": dict(sorted(self.population_by_country.items())),
            "top_cities": [dict(entry[3]) for entry in top_entries],
        }
