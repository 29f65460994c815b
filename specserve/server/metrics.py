"""ServerMetrics: the Prometheus view of one server, on its own CollectorRegistry.

Two sources. Latencies (time to first token, inter-token, end-to-end) are observed here, on the
event loop, as a request's outputs arrive. Everything the engine counts (requests by finish
reason, tokens, running / waiting, KV usage, speculation per proposer) is read at scrape time
from the snapshot the engine thread publishes (``AsyncEngine.stats()``), so a scrape never
touches the engine itself. Per API key id: rate-limit refusals and the extraction monitor's
signals, also computed at scrape time. Plus the process's own (resident memory, CPU). Knows
nothing about HTTP routes.

Speculation series carry two labels: ``source`` (``draft``: the draft model proposed;
``ngram``: prompt lookup did) and ``draft_version`` (the draft checkpoint behind ``draft``
proposals; ``none`` for ``ngram`` ones, which no draft model made).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from specserve.engine.metrics import SpeculationStats
from specserve.engine.outputs import RequestOutput
from specserve.server.async_engine import NGRAM_SOURCE, AsyncEngine, Member
from specserve.server.extraction import ExtractionMonitor
from specserve.server.limits import RateLimiter

if TYPE_CHECKING:
    from specserve.server.draft_watcher import DraftWatcher
    from specserve.server.traffic_log import TrafficLog
    from specserve.server.trainer_process import TrainerProcess

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                         1.0, 2.5, 5.0)
NO_DRAFT = "none"
"""The engine's draft version when it has no draft model; the ``draft_version`` label of n-gram proposals."""


def _labels(key: str) -> tuple[str, str]:
    """(source, draft_version) of an ``EngineMetrics.speculation`` key."""
    return ("ngram", NO_DRAFT) if key == NGRAM_SOURCE else ("draft", key)


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
        yield GaugeMetricFamily("specserve_requests_running", "Requests in the running batch.",
                                value=stats.num_running)
        yield GaugeMetricFamily("specserve_requests_waiting", "Requests admitted but not running yet.",
                                value=stats.num_waiting)
        usage = GaugeMetricFamily("specserve_kv_cache_usage_ratio",
                                  "Fraction of KV blocks held by requests. The verifier and the draft share one "
                                  "block pool (a block holds both models' KV for the same tokens), so both "
                                  "report the same ratio.", labels=["model"])
        usage.add_metric(["verifier"], stats.kv_usage)
        if stats.draft_version != NO_DRAFT:
            usage.add_metric(["draft"], stats.kv_usage)
        yield usage
        yield GaugeMetricFamily("specserve_kv_cache_free_blocks", "KV blocks free (cached-but-unused ones "
                                "included).", value=stats.num_free_blocks)
        yield GaugeMetricFamily("specserve_kv_cache_blocks", "KV blocks in the pool.", value=stats.num_blocks)
        draft = GaugeMetricFamily("specserve_draft_version", "The loaded draft model (info: always 1; "
                                  "version='none' without one).", labels=["version"])
        draft.add_metric([stats.draft_version], 1)
        yield draft
        yield from self._speculation(m.speculation)

    def _speculation(self, per_key: dict[str, SpeculationStats]) -> Iterator[Metric]:
        stats = dict(per_key)
        for key in self.async_engine.speculation_keys:  # the proposers in use show at zero before they propose
            stats.setdefault(key, SpeculationStats())
        label = ["source", "draft_version"]
        drafted = CounterMetricFamily("specserve_spec_draft_tokens", "Draft tokens proposed.", labels=label)
        accepted = CounterMetricFamily("specserve_spec_accepted_tokens", "Draft tokens accepted.", labels=label)
        steps = CounterMetricFamily("specserve_spec_verify_steps",
                                    "Request-steps that verified at least one draft token.", labels=label)
        emitted = CounterMetricFamily("specserve_spec_emitted_tokens",
                                      "Tokens emitted by those steps (accepted + recovered or bonus).", labels=label)
        per_pos_drafted = CounterMetricFamily("specserve_spec_draft_tokens_per_position",
                                              "Draft tokens proposed at each position (0 = first).",
                                              labels=[*label, "position"])
        per_pos_accepted = CounterMetricFamily("specserve_spec_accepted_tokens_per_position",
                                               "Draft tokens accepted at each position (0 = first).",
                                               labels=[*label, "position"])
        mean_len = GaugeMetricFamily("specserve_spec_mean_acceptance_length",
                                     "Tokens emitted per verification step (accepted + 1), since start.",
                                     labels=label)
        rate = GaugeMetricFamily("specserve_spec_acceptance_rate", "Accepted / drafted tokens, since start.",
                                 labels=label)
        for key, s in sorted(stats.items()):
            labels = list(_labels(key))
            drafted.add_metric(labels, s.drafted_tokens)
            accepted.add_metric(labels, s.accepted_tokens)
            steps.add_metric(labels, s.verification_steps)
            emitted.add_metric(labels, s.emitted_tokens)
            for pos, (d, a) in enumerate(zip(s.drafted_per_position, s.accepted_per_position, strict=True)):
                per_pos_drafted.add_metric([*labels, str(pos)], d)
                per_pos_accepted.add_metric([*labels, str(pos)], a)
            mean_len.add_metric(labels, s.mean_acceptance_length)
            rate.add_metric(labels, s.acceptance_rate)
        yield from (drafted, accepted, steps, emitted, per_pos_drafted, per_pos_accepted, mean_len, rate)


class _AccessCollector(Collector):
    """Per key id: rate-limit refusals, and the extraction monitor's signals at scrape time."""

    def __init__(self, limiter: RateLimiter, extraction: ExtractionMonitor, clock: Callable[[], float]) -> None:
        self.limiter = limiter
        self.extraction = extraction
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily("specserve_rate_limited_requests", "Requests refused with 429 by a key's "
                                      "rate limit, by the limit that was short.", labels=["key_id", "limit"])
        for (key_id, limit), count in sorted(self.limiter.rejections().items()):
            refused.add_metric([key_id, limit], count)
        yield refused
        label = ["key_id"]
        gauges = {
            "requests": GaugeMetricFamily("specserve_extraction_window_requests",
                                          "Requests of the key in the extraction monitor's window.", labels=label),
            "templates": GaugeMetricFamily("specserve_extraction_templates",
                                           "Near-duplicate prompt templates of the key in the window.", labels=label),
            "templated_fraction": GaugeMetricFamily("specserve_extraction_templated_fraction",
                                                    "Share of the key's prompts in templates filled with many "
                                                    "different prompts.", labels=label),
            "shared_fraction": GaugeMetricFamily("specserve_extraction_shared_template_fraction",
                                                 "Share of the key's prompts in templates other keys use too.",
                                                 labels=label),
            "timing_cv": GaugeMetricFamily("specserve_extraction_timing_cv", "Coefficient of variation of the "
                                           "gaps between the key's requests (NaN: too few).", labels=label),
            "flagged": GaugeMetricFamily("specserve_extraction_flagged", "1 when the key's signals add up to "
                                         "distillation-style extraction (detection only).", labels=label),
        }
        for s in self.extraction.report(self.clock()):
            for name, gauge in gauges.items():
                value = getattr(s, name)
                gauge.add_metric([s.key_id], float("nan") if value is None else float(value))
        yield from gauges.values()


class DraftWatchCollector(Collector):
    """The draft watcher's swaps, refusals by reason and rollbacks (online distillation)."""

    def __init__(self, watcher: DraftWatcher) -> None:
        self.watcher = watcher

    def collect(self) -> Iterator[Metric]:
        s = self.watcher.stats()
        rejected = CounterMetricFamily("specserve_draft_rejected", "Published draft versions refused by the draft "
                                       "watcher (the current draft stayed), by the check that failed.",
                                       labels=["reason"])
        for reason, n in s.rejected.items():
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily("specserve_draft_swaps", "Published draft versions swapped in.", value=s.swaps)
        yield CounterMetricFamily("specserve_draft_rollbacks", "Draft versions swapped back out because their live "
                                  "acceptance fell below the draft they replaced.", value=s.rollbacks)


class TrafficLogCollector(Collector):
    """The traffic log's writes, drops and write errors, read from its store's counters at scrape time."""

    def __init__(self, traffic: TrafficLog) -> None:
        self.traffic = traffic

    def collect(self) -> Iterator[Metric]:
        t = self.traffic
        yield CounterMetricFamily("specserve_traffic_records_written", "Finished requests written to the traffic "
                                  "log.", value=t.written_records)
        yield CounterMetricFamily("specserve_traffic_records_dropped", "Finished requests the traffic log lost: its "
                                  "buffer was full (the store was slow or unreachable) or the store could not be "
                                  "opened.", value=t.dropped_records)
        yield CounterMetricFamily("specserve_traffic_write_errors", "Failed traffic-store writes (each is retried) "
                                  "and failures to open the store.", value=t.write_errors)


class TrainerCollector(Collector):
    """The online trainer subprocess: up or not, and how often it had to be restarted."""

    def __init__(self, trainer: TrainerProcess) -> None:
        self.trainer = trainer

    def collect(self) -> Iterator[Metric]:
        s = self.trainer.stats()
        yield GaugeMetricFamily("specserve_trainer_up", "1 while the online trainer process runs.",
                                value=int(s.running))
        yield CounterMetricFamily("specserve_trainer_restarts", "Online trainer restarts after it exited on its own.",
                                  value=s.restarts)


class ServerMetrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, async_engine: AsyncEngine, limiter: RateLimiter | None = None,
                 extraction: ExtractionMonitor | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # process_resident_memory_bytes & co: what a soak test watches for growth
        ProcessCollector(registry=self.registry)
        self.ttft = Histogram("specserve_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("specserve_inter_token_latency_seconds",
                             "Gap between successive outputs of a request divided by the tokens the later one "
                             "carried (one observation per output; speculation emits several tokens at once).",
                             buckets=TOKEN_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("specserve_e2e_request_latency_seconds", "Arrival to the last token of a request.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(async_engine))
        if limiter is not None and extraction is not None:
            self.registry.register(_AccessCollector(limiter, extraction, clock))

    def output(self, member: Member, out: RequestOutput) -> None:
        """Loop: observe one output of ``member``, right after ``RequestGroup.outputs`` yielded it."""
        if out.delta_token_ids:
            if member.token_gap is None:
                self.ttft.observe(member.first_token_time - member.arrival_time)
            else:
                self.itl.observe(member.token_gap / len(out.delta_token_ids))
        if out.finished and member.finish_time is not None:  # aborted ones say nothing about latency
            self.e2e.observe(member.finish_time - member.arrival_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
