"""What a person sees: log lines in plain terms, and a progress bar on anything long.

Only the first process of a torchrun job speaks. Log lines read like
`pretrain macro  step 120/600  loss 2.31  14.2k tok/s  eta 3m`; the bar (tqdm) shows only on a
terminal, so logs written to files stay one line per event.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    if is_main():
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def rate(per_second: float) -> str:
    """14200 -> '14.2k'."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if per_second >= scale:
            return f"{per_second / scale:.1f}{unit}"
    return f"{per_second:.0f}"


def duration(seconds: float) -> str:
    """Rounded for a person: '45s', '3m', '1h05m'."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds // 3600:.0f}h{(seconds % 3600) / 60:02.0f}m"


class Progress:
    """A bar over `total` steps starting at `start`, and a log line every `every` steps."""

    def __init__(self, label: str, total: int, start: int = 0, every: int = 10):
        self.label, self.total, self.every = label, total, every
        self.start_step, self.t0 = start, time.perf_counter()
        self.bar = tqdm(total=total, initial=start, desc=label, leave=False, dynamic_ncols=True,
                        disable=not (is_main() and sys.stderr.isatty()))

    def update(self, step: int, tokens_per_s: float, **values: float) -> None:
        self.bar.update(step - self.bar.n)
        shown = "  ".join(f"{k} {v:.3g}" if abs(v) < 1000 else f"{k} {v:.0f}" for k, v in values.items())
        self.bar.set_postfix_str(f"{shown}  {rate(tokens_per_s)} tok/s", refresh=False)
        if step % self.every == 0 or step == self.total:
            done = step - self.start_step
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
            log(f"{self.label}  step {step}/{self.total}  {shown}  {rate(tokens_per_s)} tok/s  eta {duration(eta)}")

    def close(self) -> None:
        self.bar.close()
