"""Filling a prompt to a length: the largest haystack whose prompt, plus the tokens to
generate, fits the length in the model's tokenizer (RULER's budget)."""

from __future__ import annotations

from typing import Callable, Optional

from mixtrain.eval.tasks.base import PromptTooLong


class LengthFitter:
    """Largest haystack size ``h`` whose prompt fits ``budget`` tokens: secant estimates
    (from the previous sample's size when there is one), galloping, then bisection to
    within ~0.05% of ``h``. Token counts are nearly monotone in ``h``."""

    def __init__(self, tokenizer, length: int, max_new: int, probe: bool = False, task: str = ""):
        self.tok, self.length, self.max_new = tokenizer, int(length), int(max_new)
        self.budget = self.length - self.max_new
        self.probe, self.task = probe, task  # probe: only check that the smallest haystack fits
        self.hint: dict[str, int] = {}

    def fit(self, key: str, build: Callable[[int], str], h_max: Optional[int] = None, h_min: int = 0) -> tuple[int, str, list[int]]:
        memo: dict[int, tuple[bool, str, list[int]]] = {}

        def fits(h: int) -> bool:
            if h not in memo:
                text = build(h)
                ids = self.tok.encode(text)
                memo[h] = (len(ids) <= self.budget, text, ids)
            return memo[h][0]

        if not fits(h_min):
            n = len(memo[h_min][2])
            smallest = "without any haystack" if h_min == 0 else "even with the smallest haystack"
            raise PromptTooLong(
                self.task or key.split("/")[0], self.length,
                f"the prompt needs {n} tokens {smallest}, plus {self.max_new} to generate: "
                f"{n + self.max_new} in all, more than the length {self.length}",
                needed=n + self.max_new,
            )
        if self.probe:
            _, text, ids = memo[h_min]
            return h_min, text, ids
        cap = h_max if h_max is not None else 1 << 40
        n0 = len(memo[h_min][2])
        h = max(h_min, min(self.hint.get(key, h_min + 64), cap))
        for _ in range(2):  # secant steps: tokens grow about linearly with the haystack size
            fits(h)
            n = len(memo[h][2])
            if h == h_min or n <= n0:
                break
            est = h_min + int((self.budget - n0) * (h - h_min) / (n - n0) * 0.998)
            est = max(h_min, min(est, cap))
            if est == h:
                break
            h = est
        step = max(1, (h - h_min) // 512)
        if fits(h):
            lo, hi = h, None
            while hi is None:
                nxt = lo + step
                if h_max is not None and nxt > h_max:
                    nxt = h_max
                    if nxt == lo:
                        break
                if fits(nxt):
                    lo = nxt
                    step *= 2
                    if h_max is not None and lo == h_max:
                        break
                else:
                    hi = nxt
        else:
            lo, hi = None, h
            while lo is None:
                nxt = max(h_min, hi - step)
                if fits(nxt):
                    lo = nxt
                else:
                    hi = nxt
                    step *= 2
        if hi is not None:
            # Stop within ~0.05% of the haystack (a few tokens even at 32K+).
            while hi - lo > max(1, (lo - h_min) // 2000):
                mid = (lo + hi) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid
        self.hint[key] = lo
        _, text, ids = memo[lo]
        return lo, text, ids
