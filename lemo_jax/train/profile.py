"""Where a training step's time goes: one step under the JAX profiler, summarised by op.

`profile_call(fn, directory)` runs `fn()` inside `jax.profiler.trace` (a TensorBoard / Perfetto
trace in `directory`, to open in either) and returns fn's result and `summarize_trace` of the
trace: the time of every op (GPU kernel, or XLA op on a CPU) added up by name, the top ones,
and totals per category.
Categories come from kernel names (cuDNN attention, matmuls, Pallas/Triton kernels, the rest);
they are a reading aid, the names are the data.
"""

from __future__ import annotations

import collections
import gzip
import json
from collections.abc import Callable
from pathlib import Path

import jax

# Substrings of kernel names, checked in order; the first match names the category.
_CATEGORIES = (
    ("block scores", ("lemo_block_scores",)),
    ("row kernels", ("lemo_gather_rmsnorm", "lemo_scatter_add_rows")),
    ("attention", ("cudnn", "fmha", "flash", "attention")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "dot", "matmul")),
    ("pallas/triton", ("triton", "pallas")),
)
# Host-side bookkeeping events that wrap the ops rather than being ops.
_WRAPPERS = ("PjitFunction", "ExecuteHelper", "Execute", "ThunkExecutor", "TfrtCpuExecutable")


def category(name: str) -> str:
    lowered = name.lower()
    for label, keys in _CATEGORIES:
        if any(key in lowered for key in keys):
            return label
    return "other"


def summarize_trace(path: str | Path, *, top: int = 20) -> dict:
    """Adds up the durations of a Perfetto trace's complete events per name: the device's
    events when the trace has a device (a GPU), else the host's op events (CPU backends run
    XLA ops on host threads), leaving out Python frames and executable wrappers."""
    with gzip.open(path, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {
        event["pid"]: event.get("args", {}).get("name", "")
        for event in events
        if event.get("ph") == "M" and event.get("name") == "process_name"
    }
    devices = {pid for pid, name in processes.items() if "/device:" in name}
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        name = str(event.get("name", ""))
        if devices:
            if event.get("pid") not in devices:
                continue
        elif name.startswith("$") or any(name.startswith(w) for w in _WRAPPERS):
            continue
        totals[name] += float(event["dur"]) / 1e3  # microseconds -> ms
    by_category: collections.Counter = collections.Counter()
    for name, ms in totals.items():
        by_category[category(name)] += ms
    return dict(
        source="device" if devices else "host",
        total_ms=sum(totals.values()),
        categories_ms=dict(by_category.most_common()),
        top_ops_ms=dict(totals.most_common(top)),
    )


def profile_call(
    fn: Callable[[], object], directory: str | Path, *, top: int = 20
) -> tuple[object, dict]:
    """Runs `fn()` (which must wait for its results) under the profiler; writes the trace and
    `profile_summary.json` into `directory`; returns fn's result and the summary."""
    directory = Path(directory)
    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        result = fn()
    traces = sorted(directory.glob("plugins/profile/*/perfetto_trace.json.gz"))
    if not traces:
        raise RuntimeError(f"the profiler wrote no Perfetto trace under {directory}")
    summary = summarize_trace(traces[-1], top=top)
    summary["trace"] = str(traces[-1])
    (directory / "profile_summary.json").write_text(json.dumps(summary, indent=1))
    return result, summary


__all__ = ["category", "profile_call", "summarize_trace"]
