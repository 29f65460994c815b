"""ServerMetrics: the Prometheus view of one server, on its own CollectorRegistry.

Two sources. Latencies (time to first token, end-to-end) are observed here, on the event loop,
when a request finishes. Everything the engine counts (requests by finish reason, tokens,
running / waiting, KV usage, speculation per draft version) is read at scrape time from the
snapshot the engine thread publishes (``AsyncEngine.stats()``), so a scrape never touches the
engine itself. Knows nothing about HTTP routes.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from specserve.engine.metrics import SpeculationStats
from specserve.server.async_engine import AsyncEngine, Member

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    def __init__(self, async_engine: AsyncEngine) -> None:
        self.async_engine = async_engine

    def collect(self) -> Iterator[Metric]:
        stats = self.async_engine.stats()
        m = stats.metrics

        finished = CounterMetricFamily("specserve_requests_finished", "Finished requests by finish reason.",
                                       labels=["finish_reason"])
        for reason in ("stop", "length", "abort"):
            finished.add_metric([reason], m.finished_requests.get(reason, 0))
        yield finished
        yield CounterMetricFamily("specserve_prompt_tokens", "Prompt tokens admitted.", value=m.prompt_tokens)
        yield CounterMetricFamily("specserve_generation_tokens", "Tokens generated.", value=m.generation_tokens)
        yield CounterMetricFamily("specserve_engine_steps", "Engine steps run.", value=m.steps)
        yield CounterMetricFamily("specserve_preemptions", "Requests preempted for KV space.", value=m.preemptions)
        yield CounterMetricFamily("specserve_engine_step_errors", "Engine steps that raised (their requests got "
                                  "a 500).", value=stats.step_errors)
        yield GaugeMetricFamily("specserve_num_requests_running", "Requests in the running batch.",
                                value=stats.num_running)
        yield GaugeMetricFamily("specserve_num_requests_waiting", "Requests admitted but not running yet.",
                                value=stats.num_waiting)
        yield GaugeMetricFamily("specserve_kv_cache_usage_ratio", "Fraction of KV blocks held by requests.",
                                value=stats.kv_usage)
        yield GaugeMetricFamily("specserve_kv_cache_free_blocks", "KV blocks free (cached-but-unused ones "
                                "included).", value=stats.num_free_blocks)
        yield GaugeMetricFamily("specserve_kv_cache_blocks", "KV blocks in the pool.", value=stats.num_blocks)
        yield from self._speculation(stats.draft_version, m.speculation)

    def _speculation(self, draft_version: str, per_version: dict[str, SpeculationStats]) -> Iterator[Metric]:
        versions = dict(per_version)
        if draft_version != "none":  # show the loaded draft at zero before it drafts anything
            versions.setdefault(draft_version, SpeculationStats())
        label = ["draft_version"]
        drafted = CounterMetricFamily("specserve_spec_decode_num_draft_tokens", "Draft tokens proposed.",
                                      labels=label)
        accepted = CounterMetricFamily("specserve_spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                                       labels=label)
        steps = CounterMetricFamily("specserve_spec_decode_num_verification_steps",
                                    "Request-steps that verified at least one draft token.", labels=label)
        emitted = CounterMetricFamily("specserve_spec_decode_num_emitted_tokens",
                                      "Tokens emitted by those steps (accepted + recovered or bonus).", labels=label)
        per_pos_drafted = CounterMetricFamily("specserve_spec_decode_num_draft_tokens_per_pos",
                                              "Draft tokens proposed at each position (0 = first).",
                                              labels=["draft_version", "position"])
        per_pos_accepted = CounterMetricFamily("specserve_spec_decode_num_accepted_tokens_per_pos",
                                               "Draft tokens accepted at each position (0 = first).",
                                               labels=["draft_version", "position"])
        mean_len = GaugeMetricFamily("specserve_spec_decode_mean_acceptance_length",
                                     "Tokens emitted per verification step (accepted + 1), since start.",
                                     labels=label)
        rate = GaugeMetricFamily("specserve_spec_decode_acceptance_rate", "Accepted / drafted tokens, since start.",
                                 labels=label)
        for version, s in sorted(versions.items()):
            drafted.add_metric([version], s.drafted_tokens)
            accepted.add_metric([version], s.accepted_tokens)
            steps.add_metric([version], s.verification_steps)
            emitted.add_metric([version], s.emitted_tokens)
            for pos, (d, a) in enumerate(zip(s.drafted_per_position, s.accepted_per_position, strict=True)):
                per_pos_drafted.add_metric([version, str(pos)], d)
                per_pos_accepted.add_metric([version, str(pos)], a)
            mean_len.add_metric([version], s.mean_acceptance_length)
            rate.add_metric([version], s.acceptance_rate)
        yield from (drafted, accepted, steps, emitted, per_pos_drafted, per_pos_accepted, mean_len, rate)


class ServerMetrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, async_engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("specserve_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("specserve_e2e_request_latency_seconds", "Arrival to the last token of a request.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(async_engine))

    def request_finished(self, member: Member) -> None:
        """Observe a request that ran to its end (aborted ones say nothing about latency)."""
        if member.first_token_time is not None:
            self.ttft.observe(member.first_token_time - member.arrival_time)
        if member.finish_time is not None:
            self.e2e.observe(member.finish_time - member.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
