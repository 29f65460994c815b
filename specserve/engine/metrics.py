"""EngineMetrics: counters of what the engine did, speculation included, kept per draft version.

Plain numbers only; the server exports them to Prometheus and the benchmarks read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpeculationStats:
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verification_steps: int = 0  # request-steps that verified >= 1 draft token
    emitted_tokens: int = 0  # tokens emitted by those steps (accepted + recovered/bonus)
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification step: accepted draft tokens + 1."""
        return self.emitted_tokens / self.verification_steps if self.verification_steps else 0.0

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.drafted_tokens += num_drafted
        self.accepted_tokens += num_accepted
        self.verification_steps += 1
        self.emitted_tokens += num_accepted + 1
        while len(self.drafted_per_position) < num_drafted:
            self.drafted_per_position.append(0)
            self.accepted_per_position.append(0)
        for j in range(num_drafted):
            self.drafted_per_position[j] += 1
            if j < num_accepted:
                self.accepted_per_position[j] += 1


@dataclass
class EngineMetrics:
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    preemptions: int = 0
    finished_requests: dict[str, int] = field(default_factory=dict)
    verifier_seconds: float = 0.0
    draft_seconds: float = 0.0
    speculation: dict[str, SpeculationStats] = field(default_factory=dict)
    """Per draft version."""

    def spec(self, draft_version: str) -> SpeculationStats:
        return self.speculation.setdefault(draft_version, SpeculationStats())

    def total_speculation(self) -> SpeculationStats:
        total = SpeculationStats()
        for s in self.speculation.values():
            total.drafted_tokens += s.drafted_tokens
            total.accepted_tokens += s.accepted_tokens
            total.verification_steps += s.verification_steps
            total.emitted_tokens += s.emitted_tokens
            for j, (d, a) in enumerate(zip(s.drafted_per_position, s.accepted_per_position, strict=True)):
                while len(total.drafted_per_position) <= j:
                    total.drafted_per_position.append(0)
                    total.accepted_per_position.append(0)
                total.drafted_per_position[j] += d
                total.accepted_per_position[j] += a
        return total
