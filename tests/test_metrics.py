"""``/metrics``: the bridge's own metrics, the process's, and the build, in valid Prometheus text."""

from __future__ import annotations

import platform

from prometheus_client.parser import text_string_to_metric_families

from bridge import __version__
from bridge.metrics import Metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed by prometheus-client's own parser (invalid text raises)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_exposition_parses_with_escaped_labels_process_metrics_and_the_build() -> None:
    metrics = Metrics()
    metrics.refused.inc(label='a "quoted"\nreason\\')  # a label value that must be escaped
    metrics.calls.inc(2, label="completed")
    metrics.live_calls.inc()
    metrics.clear_delay.observe(0.0015)
    parsed = samples(metrics.render())
    assert parsed[("bridge_refused_total", (("reason", 'a "quoted"\nreason\\'),))] == 1
    assert parsed[("bridge_calls_total", (("outcome", "completed"),))] == 2
    assert parsed[("bridge_live_calls", ())] == 1
    assert parsed[("bridge_clear_latency_seconds_bucket", (("le", "0.002"),))] == 1
    assert parsed[("bridge_clear_latency_seconds_bucket", (("le", "0.001"),))] == 0
    assert parsed[("bridge_clear_latency_seconds_count", ())] == 1
    assert parsed[("process_resident_memory_bytes", ())] > 1_000_000
    assert parsed[("process_open_fds", ())] > 0
    build = (("python", platform.python_version()), ("version", __version__))
    assert parsed[("bridge_build_info", build)] == 1
