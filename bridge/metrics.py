"""Prometheus metrics for ``GET /metrics``.

The bridge's own counters, gauges and histograms are kept here as plain objects: observing is a dict
lookup and an addition, cheap enough for the per-frame path. They are rendered through prometheus-client:
a collector (:class:`_Collector`) turns them into metric families when ``/metrics`` is scraped, beside the
client's process and platform collectors and ``bridge_build_info``, so the exposition (label escaping,
the text format) is the client's. One :class:`Metrics` object lives on the app; nothing is global.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bridge import __version__

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


def _bound(value: float) -> str:
    """A bucket's ``le`` as Prometheus writes it: ``0.5``, ``1.0``, ``+Inf``."""
    return repr(float(value))


class Counter:
    """A monotonically increasing count, optionally split by one label."""

    def __init__(self, name: str, help_text: str, label: str | None = None) -> None:
        self.name, self.help, self.label = name, help_text, label
        self.values: dict[str, float] = {}

    def inc(self, amount: float = 1.0, label: str = "") -> None:
        """Add ``amount`` (to the series of ``label``)."""
        self.values[label] = self.values.get(label, 0.0) + amount

    def get(self, label: str = "") -> float:
        """The current value of one series."""
        return self.values.get(label, 0.0)

    def family(self) -> Metric:
        """This counter as a metric family (one sample per label value seen; unlabelled: one)."""
        if not self.label:
            return CounterMetricFamily(self.name, self.help, value=self.values.get("", 0.0))
        family = CounterMetricFamily(self.name, self.help, labels=[self.label])
        for label, value in sorted(self.values.items()):
            if label:
                family.add_metric([label], value)
        return family


class Gauge:
    """A value that goes up and down."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount``."""
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract ``amount``."""
        self.value -= amount

    def family(self) -> Metric:
        """This gauge as a metric family."""
        return GaugeMetricFamily(self.name, self.help, value=self.value)


class Histogram:
    """Counts of observations in cumulative buckets, plus their sum."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name, self.help = name, help_text
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def family(self) -> Metric:
        """This histogram as a metric family (cumulative buckets)."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            buckets.append((_bound(bound), running))
        buckets.append(("+Inf", self.count))
        return HistogramMetricFamily(self.name, self.help, buckets=buckets, sum_value=self.sum)


class Metrics:
    """Every metric the bridge exports."""

    def __init__(self) -> None:
        self.live_calls = Gauge("bridge_live_calls", "Calls in progress.")
        self.calls = Counter("bridge_calls_total", "Calls ended, by how they ended.", "outcome")
        self.frames_in = Counter("bridge_frames_in_total", "Caller audio frames received from Twilio.")
        self.frames_out = Counter("bridge_frames_out_total", "Model audio frames sent to Twilio.")
        self.barge_ins = Counter("bridge_barge_ins_total", "Times the caller interrupted the model.")
        self.truncations = Counter("bridge_truncations_total", "conversation.item.truncate sent.")
        self.upstream_errors = Counter(
            "bridge_upstream_errors_total", "Realtime error events and failed connects.", "code"
        )
        self.malformed = Counter(
            "bridge_malformed_messages_total", "Messages skipped as malformed.", "source"
        )
        self.refused = Counter("bridge_refused_total", "Requests or streams refused.", "reason")
        self.discarded = Counter(
            "bridge_twilio_discarded_total",
            "Media that was not a call's caller audio, counted at its end.",
            "why",
        )
        self.sequence_gaps = Counter(
            "bridge_twilio_sequence_gaps_total",
            "Jumps in Twilio's sequence numbers, counted at a call's end.",
        )
        self.inbound_delay = Histogram(
            "bridge_inbound_added_seconds", "Caller frame received from Twilio to sent to the model."
        )
        self.outbound_delay = Histogram(
            "bridge_outbound_added_seconds", "Model audio received to its frame sent to Twilio."
        )
        self.clear_delay = Histogram(
            "bridge_clear_latency_seconds", "speech_started received to Twilio clear sent."
        )
        self.rollovers = Counter("bridge_rollovers_total", "Planned swaps to a new Realtime session.")
        self.reconnects = Counter(
            "bridge_reconnects_total", "Realtime sessions lost in a live call and replaced.", "cause"
        )
        self.reconnect_gap = Histogram(
            "bridge_reconnect_gap_seconds",
            "From a lost Realtime session to the swap to its replacement.",
            (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
        )
        self.holds = Counter(
            "bridge_hold_prompts_total", 'Times a caller heard "one moment, please" during a reconnection.'
        )
        self.breaker = Gauge(
            "bridge_upstream_breaker_state", "Realtime connect breaker: 0 closed, 0.5 probing, 1 open."
        )
        self.store_errors = Counter(
            "bridge_store_errors_total",
            "Store operations that failed (call records after their retries, with what they held in the"
            " log), by what: call_record, call_answer, stream_claim, heartbeat, interrupted_calls,"
            " recording_upload, admin_session.",
            "what",
        )
        # Playback towards Twilio (marks and the send bound): see bridge/playback.py.
        self.twilio_ahead = Histogram(
            "bridge_twilio_ahead_seconds",
            "Model audio sent to Twilio and not yet proved played by a mark, after each batch of audio sent.",
            (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0),
        )
        self.twilio_held = Histogram(
            "bridge_twilio_held_seconds",
            "Model audio held in the bridge behind the send bound, after each batch of audio sent.",
            (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 60.0),
        )
        self.twilio_bound_hits = Counter(
            "bridge_twilio_send_bound_hits_total",
            "Times model audio was held back in the bridge: as much as the bound was sent ahead of playback.",
        )
        self.twilio_held_cuts = Counter(
            "bridge_twilio_held_cap_hits_total",
            "Responses cut where the audio held for Twilio reached its cap.",
        )
        self.marks_lost = Counter(
            "bridge_twilio_marks_lost_total",
            "Marks not echoed in time after their audio should have played, taken as played.",
        )
        # Caller audio towards the model (the send bound): see bridge/streams.py.
        self.model_backlog = Histogram(
            "bridge_model_backlog_seconds",
            "Peak caller audio waiting for a Realtime socket that could not take it at once, per episode.",
            (0.02, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0),
        )
        self.model_bound_hits = Counter(
            "bridge_model_send_bound_hits_total",
            "Realtime sessions replaced as stalled: too much caller audio waited for their socket.",
        )
        self.connect_time = Histogram(
            "bridge_upstream_connect_seconds",
            "Realtime connect and session.update.",
            (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
        )

        self.registry = CollectorRegistry(auto_describe=False)
        """What ``/metrics`` renders: these metrics, the process's and the platform's, the build."""
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def families(self) -> Iterator[Metric]:
        """Every metric of the bridge as a metric family, and ``bridge_build_info``."""
        for metric in vars(self).values():
            if isinstance(metric, Counter | Gauge | Histogram):
                yield metric.family()
        info = GaugeMetricFamily(
            "bridge_build_info", "The bridge's version and Python's.", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info

    def render(self) -> str:
        """The whole exposition, Prometheus text format 0.0.4 (prometheus-client's)."""
        return generate_latest(self.registry).decode()


class _Collector(Collector):
    """Hands the bridge's own metrics to prometheus-client when it is scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.families()
