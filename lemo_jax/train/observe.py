"""What a run reports: metrics.jsonl, TensorBoard events (if installed), device memory."""

from __future__ import annotations

import json
from pathlib import Path

import jax

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per record to `metrics.jsonl`, and to TensorBoard if available.

    On resume, records of steps after the restored checkpoint (logged before an interruption but
    not checkpointed) are dropped first, so the file holds one record per step.
    """

    def __init__(self, directory: Path, *, resume_step: int, is_writer: bool = True):
        self.path = directory / METRICS_FILE
        self._file = self._tensorboard = None
        if not is_writer:  # other processes of a multi-host run: process 0 reports
            return
        if self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        self._tensorboard = _tensorboard_writer(directory / "tensorboard")

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _tensorboard_writer(directory: Path):
    try:
        import tensorboard  # noqa: F401 (torch's writer needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))


def peak_device_memory_gib() -> float | None:
    """Peak bytes in use per device (GPU): the largest over this process's devices, which is
    what runs out first under a mesh. None where the backend does not say (CPU)."""
    peaks = [
        (device.memory_stats() or {}).get("peak_bytes_in_use") for device in jax.local_devices()
    ]
    known = [peak for peak in peaks if peak is not None]
    return max(known) / 2**30 if known else None


def device_memory_limit_gib() -> float | None:
    """The bytes this process may allocate per device (GPU), the smallest over its devices (the
    allocator's `bytes_limit`, set by XLA_PYTHON_CLIENT_MEM_FRACTION). None where the backend
    does not say (CPU)."""
    limits = [(device.memory_stats() or {}).get("bytes_limit") for device in jax.local_devices()]
    known = [limit for limit in limits if limit is not None]
    return min(known) / 2**30 if known else None


def compiled_memory_gib(compiled) -> float:
    """The compiled step's estimate: arguments + outputs + temporaries, aliased bytes once.
    A step compiled for a mesh is one device's program, so this is per device."""
    analysis = compiled.memory_analysis()
    total = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return total / 2**30
