"""What the CPU allocator did while a function ran, from the profiler (``profile_memory``): every allocation and
free with its size, in time order. This sees the buffers of Inductor's compiled code (its wrapper allocates
through the allocator but outside the dispatcher, so a ``TorchDispatchMode`` summing op outputs would miss them)
and the copies made inside an op. The public ``prof.events()`` folds an op's allocations into the op, losing
their order, so the events come from the profiler's event tree (what ``torch.profiler._memory_profiler`` reads)."""

from __future__ import annotations

from typing import Any, Callable

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def allocation_sizes(fn: Callable[[], Any]) -> tuple[list[int], Any]:
    """(the bytes of each allocation during ``fn()``, negative for a free, in time order; what ``fn`` returned)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    assert events, "the profiler reported no allocations"
    return [event.extra_fields.alloc_size for event in events], result


def peak_allocated(fn: Callable[[], Any]) -> int:
    """The most bytes the CPU allocator held during ``fn()`` beyond what it held when ``fn`` started."""
    live = peak = 0
    for size in allocation_sizes(fn)[0]:
        live += size
        peak = max(peak, live)
    return peak
