"""Device routines that hand their host-side planning to another thread.

A routine that launches device work and, between launches, plans on the host (numpy over what it
read back: paste blocks, steps, rounds, the final per-image arrays) is written as a generator that
yields `Host(fn, *args)` wherever the host must plan; `drive` runs it:

    drive(steps)                   # inline: everything on this thread (tests, Predictor's own calls)
    drive(steps, device=executor)  # split: the generator's device segments on `executor` (the actor's
                                   # one device thread, its own CUDA stream), every Host on this thread

so, split, the device thread only launches device work and reads results back (a read must stay on
the stream's thread: it orders the copy after the work), while the caller's thread plans and another
call's device work runs meanwhile. `spans` (optional) gets one (kind, start, end) per segment, kind
"device" or "host", perf_counter seconds: bench/gpu.py's overlap share of concurrent calls.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Generator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class Host:
    """Host work a device routine yields: `fn(*args)`, run on the driving thread; its value is sent back."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __call__(self) -> Any:
        return self.fn(*self.args)


Steps = Generator[Host, Any, T]
Span = tuple[str, float, float]  # ("device" | "host", start, end), time.perf_counter seconds


@dataclass(frozen=True)
class _Done:
    value: Any


def inline(steps: Steps[T]) -> T:
    """The routine's result, every segment on this thread."""
    return drive(steps)


def drive(steps: Steps[T], device: Executor | None = None, spans: list[Span] | None = None) -> T:
    """Runs the routine to its result: device segments on `device` (None: here), Host items here.
    A Host that raises closes the routine (its `with` blocks exit on its own thread) and re-raises."""
    value: Any = None
    while True:
        if device is None:
            item = _advance(steps, value, spans)
        else:
            item = device.submit(_advance, steps, value, spans).result()
        if isinstance(item, _Done):
            return item.value
        t0 = time.perf_counter()
        try:
            value = item()
        except BaseException:
            if device is None:
                steps.close()
            else:
                device.submit(steps.close).result()
            raise
        finally:
            if spans is not None:
                spans.append(("host", t0, time.perf_counter()))


def _advance(steps: Steps[T], value: Any, spans: list[Span] | None) -> Host | _Done:
    """One device segment: the routine up to its next Host (or its end)."""
    t0 = time.perf_counter()
    try:
        item = steps.send(value)
    except StopIteration as stop:
        item = _Done(stop.value)
    finally:
        if spans is not None:
            spans.append(("device", t0, time.perf_counter()))
    if not isinstance(item, (Host, _Done)):
        raise TypeError(f"a device routine yielded {type(item).__name__}: yield Host(fn, *args) for host work")
    return item


def overlap_share(calls: list[list[Span]]) -> float:
    """Of all the host time of every call, the share during which another call's device segment ran:
    how much of one call's host work overlapped the other's device work (0 when there is no host time).
    calls: each call's spans (host spans of the call itself included: its own pre- and post-work)."""
    host_total = overlapped = 0.0
    for i, spans in enumerate(calls):
        others = _union([(a, b) for j, other in enumerate(calls) if j != i for kind, a, b in other if kind == "device"])
        for kind, a, b in spans:
            if kind != "host":
                continue
            host_total += b - a
            overlapped += sum(max(0.0, min(b, hi) - max(a, lo)) for lo, hi in others)
    return overlapped / host_total if host_total > 0 else 0.0


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint intervals covering the same time, in order."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
