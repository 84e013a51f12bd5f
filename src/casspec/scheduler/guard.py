"""PayGuard: a scheduler's choices must pay in measured tokens per second, or they pause.

Latency models and acceptance estimates predict; a guard checks. It times whole rounds and compares the
tokens per second of rounds that used a choice with rounds that did not, and pauses the choice while it
measures slower. DyTC keeps two kinds: drafting at all against plain decoding (sampled regimes), and the
self-draft levels against the bottom level (prompt lookup) alone.
"""
from __future__ import annotations


class PayGuard:
    """A choice (drafting; the self levels) must pay in measured tokens per second, or it pauses.

    Rounds are timed whole, from draft() to observe(): drafting, verification, sampling, acceptance and the
    scheduler's own work, including what no model predicts. The tokens per second of drafted rounds (decayed
    sums) are compared with plain rounds' (before `min_plain` of those: the predicted plain step). Once
    `min_rounds` drafted rounds are slower, drafting pauses for `pause` rounds, whose plain rounds measure the
    plain rate meanwhile, then probes again from fresh sums; each failed probe doubles the pause (up to
    `max_pause`), a passing one resets it.
    """

    def __init__(self, min_rounds: int = 8, min_plain: int = 4, decay: float = 0.95, pause: int = 16,
                 max_pause: int = 256, probe: bool = False) -> None:
        """`probe`: once `min_rounds` drafted rounds are in and fewer than `min_plain` of the alternative, pause
        for the missing ones, so the comparison is with a measured rate of the alternative, not a prediction
        (the bottom level alone has none)."""
        self.min_rounds, self.min_plain, self.decay = min_rounds, min_plain, decay
        self.base_pause, self.max_pause = pause, max_pause
        self.pause = pause  # length of the next pause
        self.probe = probe
        self.left = 0  # paused rounds still to go
        self.pauses = 0  # pauses so far (reporting)
        self._drafted = [0.0, 0.0, 0]  # decayed tokens, decayed seconds, rounds since the last probe began
        self._plain = [0.0, 0.0, 0]

    def allows(self) -> bool:
        """Whether this round may draft."""
        return self.left == 0

    def rates(self) -> tuple[float | None, float | None]:
        """Measured tokens per second of drafted and of plain rounds (None: none yet)."""
        drafted, plain = (s[0] / s[1] if s[2] and s[1] > 0 else None for s in (self._drafted, self._plain))
        return drafted, plain

    def record(self, drafted: bool, tokens: int, seconds: float, plain_estimate: float) -> None:
        """One finished round: whether it drafted, the tokens it committed, its seconds, and the predicted
        tokens per second of a plain round."""
        if self.left:
            self.left -= 1
        if not seconds > 0:
            return
        sums = self._drafted if drafted else self._plain
        sums[0] = self.decay * sums[0] + tokens
        sums[1] = self.decay * sums[1] + seconds
        sums[2] += 1
        if not drafted or self._drafted[2] < self.min_rounds:
            return
        if self.probe and self._plain[2] < self.min_plain:
            # measure the alternative, then compare ([2] is a round count, in a list of floats)
            self.left = self.min_plain - int(self._plain[2])
            return
        plain = self._plain[0] / self._plain[1] if self._plain[2] >= self.min_plain else plain_estimate
        if self._drafted[0] / self._drafted[1] < plain:
            self.left, self.pause, self.pauses = self.pause, min(2 * self.pause, self.max_pause), self.pauses + 1
            self._drafted = [0.0, 0.0, 0]
        elif self._drafted[2] == self.min_rounds:  # a probe passed
            self.pause = self.base_pause
