"""What `run` and `logs --follow` print while a job trains.

On a terminal: one live status line rewritten in place (step/total, loss, held-out bits per byte,
tokens/s, MFU, ETA) and, for MoE models, a second line with each layer's load (the busiest
expert's utilisation and the dead experts). Redirected to a file or a job log: the same text as
plain lines, at most one every `interval_s` seconds (and always for the last step and for every
evaluation), never carriage-return bars.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

PROGRESS_PREFIX = "[shardyard] step "
LOAD_PREFIX = "[shardyard] experts "
_LAYER = re.compile(r"^moe/layer(\d+)/(util_max|dead)$")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def load_line(record: dict[str, Any], max_layers: int = 12) -> str | None:
    """`[shardyard] experts max load/dead per layer: L0 1.4x/0  L1 2.1x/1 ...` (busiest expert's load / fair share, dead experts);
    beyond `max_layers` layers, the worst layer and totals."""
    layers: dict[int, dict[str, float]] = {}
    for key, value in record.items():
        match = _LAYER.match(key)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = float(value)
    if not layers:
        return None
    if len(layers) <= max_layers:
        parts = [f"L{i} {v.get('util_max', 0):.1f}x/{int(v.get('dead', 0))}" for i, v in sorted(layers.items())]
        return f"{LOAD_PREFIX}max load/dead per layer: " + "  ".join(parts)
    worst = max(layers, key=lambda i: layers[i].get("util_max", 0))
    dead = sum(int(v.get("dead", 0)) for v in layers.values())
    return (
        f"{LOAD_PREFIX}{len(layers)} layers: max load {layers[worst].get('util_max', 0):.1f}x (layer {worst}), "
        f"{dead} dead experts in {sum(1 for v in layers.values() if v.get('dead', 0))} layers"
    )


class LiveStatus:
    """Fed the metric records rank 0 writes (as `run_training`'s on_progress callback)."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.total, self.initial = total, initial
        self.interval_s = interval_s
        self.val_bpb: float | None = None
        self._started: tuple[float, int] | None = None  # (time, step) of the first record seen
        self.clock = clock
        self._last_print: float | None = None  # None: the first train record always prints
        self._lines_on_screen = 0

    def status_line(self, record: dict[str, Any], now: float | None = None) -> str:
        now = self.clock() if now is None else now
        step = int(record["step"])
        parts = [f"{PROGRESS_PREFIX}{step}/{self.total}", f"loss {record.get('loss', float('nan')):.4f}"]
        if self.val_bpb is not None:
            parts.append(f"val {self.val_bpb:.3f} bpb")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.2f}%")
        if self._started is not None and step > self._started[1]:
            per_step = (now - self._started[0]) / (step - self._started[1])
            parts.append(f"ETA {_duration(per_step * (self.total - step))}")
        return "  ".join(parts)

    def __call__(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            if record.get("kind") == "eval":
                self.val_bpb = float(record["val_bpb"])
                if not self.tty:
                    self._write(
                        [
                            f"{PROGRESS_PREFIX}{record['step']}/{self.total}  val {self.val_bpb:.4f} bpb "
                            f"+- {record.get('val_bpb_stderr', 0.0):.4f}"
                        ]
                    )
                continue
            if record.get("kind") != "train":
                continue
            now = self.clock()
            if self._started is None:
                self._started = (now, int(record["step"]))
            last = int(record["step"]) >= self.total
            recent = self._last_print is not None and now - self._last_print < self.interval_s
            if not self.tty and not last and recent:
                continue
            lines = [self.status_line(record, now)]
            load = load_line(record)
            if load:
                lines.append(load)
            self._write(lines)
            self._last_print = now

    def _write(self, lines: list[str]) -> None:
        if not self.tty:
            self.stream.write("".join(f"{line}\n" for line in lines))
            self.stream.flush()
            return
        up = f"\x1b[{self._lines_on_screen - 1}A" if self._lines_on_screen > 1 else ""
        self.stream.write(up + "\r" + "\n".join(f"\x1b[K{line}" for line in lines))
        self._lines_on_screen = len(lines)
        self.stream.flush()

    def note(self, line: str) -> None:
        """A line that stays (a fault, a restart): printed above the live block, which is redrawn with
        the next record."""
        if self.tty and self._lines_on_screen:
            up = f"\x1b[{self._lines_on_screen - 1}A" if self._lines_on_screen > 1 else ""
            self.stream.write(up + "\r\x1b[J")
            self._lines_on_screen = 0
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._lines_on_screen:
            self.stream.write("\n")
            self.stream.flush()
        self._lines_on_screen = 0


def fold_progress(chunks: Iterable[str], stream: TextIO | None = None) -> None:
    """`logs --follow`: on a terminal, a job log's progress lines (status and expert load) rewrite
    one block in place; every other line (and everything, when redirected) passes through unchanged."""
    stream = stream or sys.stdout
    if not stream.isatty():
        for chunk in chunks:
            stream.write(chunk)
            stream.flush()
        return
    live = LiveStatus(total=0, stream=stream, tty=True)
    block: list[str] = []
    pending = ""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split("\n")
        for line in complete:
            if line.startswith(PROGRESS_PREFIX):
                block = [line]
                live._write(block)
            elif line.startswith(LOAD_PREFIX) and block:
                block.append(line)
                live._write(block)
            else:
                live.close()
                block = []
                stream.write(line + "\n")
        stream.flush()
    live.close()
    stream.write(pending)
    stream.flush()
