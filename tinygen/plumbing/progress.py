"""A one-line progress display with rate and ETA, and no dependencies.

On a terminal it redraws one line in place (carriage return); elsewhere
(CI logs, pipes) it prints a plain line at most every `every_s` seconds, so
logs stay readable.

>>> import io
>>> out = io.StringIO()                   # not a terminal: plain lines
>>> p = Progress(total=100, desc="merges", unit="merge", stream=out)
>>> p.update(50, loss=1.25)
>>> print(out.getvalue(), end="")
merges  50/100  50%  ... merge/s  ETA ...  elapsed 0s  loss 1.25
"""
import sys
import time


def format_duration(seconds: float) -> str:
    """Seconds as text, down to whole seconds.

    >>> format_duration(3725), format_duration(65), format_duration(4.2)
    ('1h02m05s', '1m05s', '4s')
    """
    seconds = int(round(max(seconds, 0.0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def format_rate(rate: float) -> str:
    """A rate in about three significant digits.

    >>> format_rate(12345.6), format_rate(5.0), format_rate(0.01)
    ('12.3k', '5.00', '0.010')
    """
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= threshold:
            return f"{rate / threshold:.1f}{suffix}"
    return f"{rate:.2f}" if rate >= 1 else f"{rate:.3f}"


class Progress:
    """Progress of `total` units of work: call `update(done, **fields)`, then `close()`.

    `done` is absolute (not an increment), so resuming at step 500 of 1000
    shows 500/1000 with a rate measured from the resume point.
    """

    def __init__(self, total, desc="", unit="it", stream=None, every_s=5.0, start=0, enabled=True):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start_done = start
        self.t0 = time.perf_counter()
        self.last_print = -float("inf")
        self.done = start
        self.fields = {}
        self._width = 0

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        parts = [self.desc] if self.desc else []
        if self.total:
            parts.append(f"{self.done}/{self.total} {100.0 * self.done / self.total:3.0f}%")
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            parts.append(f"{format_rate(rate)} {self.unit}/s")
            parts.append("ETA " + (format_duration(eta) if eta == eta else "?"))
        else:
            parts.append(f"{self.done} {self.unit}  {format_rate(rate)} {self.unit}/s")
        parts.append("elapsed " + format_duration(elapsed))
        for key, value in self.fields.items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return "  ".join(parts)

    def update(self, done, force=False, **fields):
        self.done = done
        self.fields.update(fields)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if force or now - self.last_print >= 0.1:
                text = self.line()
                self.stream.write("\r" + text.ljust(self._width))
                self._width = len(text)
                self.stream.flush()
                self.last_print = now
        elif force or now - self.last_print >= self.every_s:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last_print = now

    def write(self, message: str):
        """Print a message without garbling the live line."""
        if not self.enabled:
            return
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self):
        if not self.enabled:
            return
        if self.tty:
            self.update(self.done, force=True)
            self.stream.write("\n")
            self.stream.flush()
        else:
            self.update(self.done, force=True)
