"""lemo_jax.train.profile: per-op sums of a Perfetto trace, device events preferred."""

import gzip
import json

import pytest

from lemo_jax.train.profile import category, summarize_trace


def _trace(path, events):
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": events}, handle)
    return path


def _meta(pid, name):
    return {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}


def _op(pid, name, microseconds):
    return {"ph": "X", "pid": pid, "name": name, "dur": microseconds}


def test_device_events_are_summed_by_name_and_category(tmp_path):
    path = _trace(
        tmp_path / "t.json.gz",
        [
            _meta(1, "/host:CPU"),
            _meta(2, "/device:GPU:0"),
            _op(1, "PjitFunction(step)", 9000.0),  # host-side: ignored when a device exists
            _op(2, "__cudnn$fmhaSoftmax", 1500.0),
            _op(2, "__cudnn$fmhaSoftmax", 500.0),
            _op(2, "sm90_xmma_gemm_bf16", 1000.0),
            _op(2, "lemo_block_scores", 250.0),
            _op(2, "loop_fusion_3", 250.0),
        ],
    )
    summary = summarize_trace(path, top=2)
    assert summary["source"] == "device"
    assert summary["total_ms"] == pytest.approx(3.5)
    assert summary["categories_ms"] == pytest.approx(
        {"attention": 2.0, "matmul": 1.0, "block scores": 0.25, "other": 0.25}
    )
    assert list(summary["top_ops_ms"]) == ["__cudnn$fmhaSoftmax", "sm90_xmma_gemm_bf16"]


def test_without_a_device_host_ops_count_but_python_frames_and_wrappers_do_not(tmp_path):
    path = _trace(
        tmp_path / "t.json.gz",
        [
            _meta(1, "/host:CPU"),
            _op(1, "$profiler.py:307 trace", 400.0),
            _op(1, "PjitFunction(step)", 9000.0),
            _op(1, "dot.3", 2000.0),
            _op(1, "fusion.1", 1000.0),
        ],
    )
    summary = summarize_trace(path)
    assert summary["source"] == "host"
    assert summary["top_ops_ms"] == pytest.approx({"dot.3": 2.0, "fusion.1": 1.0})
    assert category("lemo_gather_rmsnorm") == "row kernels"
