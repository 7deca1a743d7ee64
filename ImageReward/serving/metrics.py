"""The server's counters and histograms, exposed as Prometheus text (``GET /metrics``).

A few counters and histograms held in memory, thread-safe, rendered in the Prometheus text exposition format
(version 0.0.4), so any Prometheus scraper reads them without a client library::

    imagereward_requests_total{model="ImageReward-v1.0",route="pickle",status="200"} 32
    imagereward_batch_size_bucket{model="ImageReward-v1.0",le="8"} 3
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

__all__ = ["Metrics"]

PREFIX = "imagereward_"
#: bucket upper bounds of each histogram (seconds, or pairs for batch_size)
BUCKETS: dict[str, tuple[float, ...]] = {
    "batch_size": (1, 2, 4, 8, 16, 32, 64, 128, 256),
    "queue_wait_seconds": (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    "batch_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    "request_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
}
HELP = {
    "requests_total": "HTTP scoring requests answered, by model, route and status",
    "request_errors_total": "scoring requests answered with an error (status >= 400)",
    "pairs_total": "image-prompt pairs scored",
    "batch_size": "pairs per model call (dynamic batching across requests)",
    "queue_wait_seconds": "time a request waited in the queue before its batch started",
    "batch_seconds": "time of one model call",
    "request_seconds": "latency of a scoring request, from its body read to its answer",
}


class Metrics:
    """Counters (:meth:`inc`) and histograms (:meth:`observe`) keyed by name and labels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self._histograms: dict[tuple[str, tuple], list] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += value

    def observe(self, name: str, value: float, **labels: str) -> None:
        bounds = BUCKETS[name]
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            hist = self._histograms.setdefault(key, [[0] * len(bounds), 0.0, 0])
            position = bisect.bisect_left(bounds, value)
            if position < len(bounds):
                hist[0][position] += 1
            hist[1] += value
            hist[2] += 1

    def render(self) -> str:
        """Everything in the Prometheus text format."""
        lines: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            histograms = {key: (list(h[0]), h[1], h[2]) for key, h in self._histograms.items()}
        for name in sorted({name for name, _ in counters}):
            lines += [f"# HELP {PREFIX}{name} {HELP.get(name, name)}", f"# TYPE {PREFIX}{name} counter"]
            lines += [f"{PREFIX}{name}{_labels(labels)} {value:g}" for (n, labels), value in sorted(counters.items())
                      if n == name]
        for name in sorted({name for name, _ in histograms}):
            lines += [f"# HELP {PREFIX}{name} {HELP.get(name, name)}", f"# TYPE {PREFIX}{name} histogram"]
            for (n, labels), (counts, total, count) in sorted(histograms.items()):
                if n != name:
                    continue
                cumulative = 0
                for bound, bucket in zip(BUCKETS[name], counts):
                    cumulative += bucket
                    lines.append(f"{PREFIX}{name}_bucket{_labels(labels + (('le', f'{bound:g}'),))} {cumulative}")
                lines.append(f"{PREFIX}{name}_bucket{_labels(labels + (('le', '+Inf'),))} {count}")
                lines.append(f"{PREFIX}{name}_sum{_labels(labels)} {total:.6g}")
                lines.append(f"{PREFIX}{name}_count{_labels(labels)} {count}")
        return "\n".join(lines) + "\n"


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    escaped = (f'{key}="' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
               for key, value in labels)
    return "{" + ",".join(escaped) + "}"
