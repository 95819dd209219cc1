"""The knobs of a migration (`python -m activator --migration-*`, docs/migration.md)."""

from __future__ import annotations

import dataclasses

from sllm_knative.api.auth import auth_headers


@dataclasses.dataclass(frozen=True)
class MigrationConfig:
    # Detach once the destination lacks at most this many tokens (not sent after a round; not yet
    # computed in the follow phase). The resume computes them before its first token, so each is
    # handoff time the client sees (on the CPU in exact numerics, two tokens cost about one step).
    gap_threshold: int = 2
    max_rounds: int = 8  # waited prefill rounds at most; then the follow phase
    # A gap at most this large ends the waited rounds: the follow phase takes over (a waited round
    # cannot get below its fixed point, the tokens the source makes while the round's export and
    # prefill run; following does not wait for either). 0: waited rounds until max_rounds.
    settle_gap: int = 16
    # Source steps at most in the follow phase before detaching regardless (a destination that
    # does not keep pace). 0: no follow phase; detach where it would begin.
    max_follow: int = 64
    request_timeout_s: float = 60.0  # one internal call (a prefill of a long context included)
    # The instances' internal token (sllm_knative/api/auth.py), sent on every internal call.
    internal_token: str | None = dataclasses.field(default=None, repr=False)
    handoff_timeout_s: float = 60.0  # from the detach until the destination's stream is spliced in
    # Seconds between exports of every relayed stream's state, so a stream whose instance dies
    # resumes from the last one instead of being cut (0: exports only during migrations). Each is
    # one internal call answered at the instance's next step boundary.
    export_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.gap_threshold < 0:
            raise ValueError(f"gap_threshold = {self.gap_threshold}, must be >= 0")
        if self.settle_gap < 0:
            raise ValueError(f"settle_gap = {self.settle_gap}, must be >= 0")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds = {self.max_rounds}, must be >= 1")
        if self.max_follow < 0:
            raise ValueError(f"max_follow = {self.max_follow}, must be >= 0")
        if self.export_interval_s < 0:
            raise ValueError(f"export_interval_s = {self.export_interval_s}, must be >= 0")
        for name in ("request_timeout_s", "handoff_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)}, must be > 0")

    @property
    def headers(self) -> dict[str, str]:
        """Headers of every call to an instance's internal API."""
        return auth_headers(self.internal_token)
