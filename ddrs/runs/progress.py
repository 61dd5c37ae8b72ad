"""Progress: a tqdm bar on a terminal; in a log or a pipe, one plain line now and then."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

PLAIN_SECONDS = 30.0


class PlainProgress:
    """Progress for logs and pipes (no terminal): one plain line every `interval` seconds."""

    def __init__(self, total: int, desc: str, interval: float = 30.0, stream=None):
        self.total, self.desc, self.interval = total, desc, interval
        self.stream = stream or sys.stderr
        self.done, self.start = 0, time.monotonic()
        self.last, self.postfix = self.start, ""

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval or (self.done >= self.total > 0):
            self.last = now
            share = self.done / self.total if self.total else 1.0
            print(
                f"{self.desc}: {self.done}/{self.total} inputs ({share:.0%}), "
                f"{now - self.start:.0f} s{self.postfix}",
                file=self.stream,
                flush=True,
            )

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {k.replace('_', '/')} {v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal; plain lines now and then in a log or pipe; or nothing."""
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total, desc, PLAIN_SECONDS)
    return tqdm(total=total, desc=desc, unit="input", disable=not enabled, dynamic_ncols=True)
