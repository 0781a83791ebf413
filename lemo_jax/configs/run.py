"""The configuration of a fine-tuning run: a tree of frozen dataclasses, one per concern.

`RunConfig` is what `scripts/finetune.py --config NAME` resolves and `--set a.b=value` overrides.
Only the training loop and the scripts see the whole tree; each module gets its own section.
"""

from __future__ import annotations

import dataclasses
import math

from lemo_jax.configs.model import ATTENTION_BACKENDS, DTYPES, ROPE_SCALINGS, LoraConfig
from lemo_jax.lemo.config import LemoConfig
from lemo_jax.model.remat import REMAT_POLICIES

SCHEDULES = ("constant", "cosine", "linear")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to fine-tune and how to run it.

    `init="pretrained"` loads `path` (Hugging Face directory, .gguf file or built-in name);
    `init="random"` builds the `preset` shape with random weights (speed and memory work).
    `rope_scaling`/`rope_factor` replace the checkpoint's RoPE settings, e.g. linear position
    interpolation by 4 to extend an 8K model to 32K.
    """

    init: str = "pretrained"
    path: str | None = None
    preset: str | None = None
    param_dtype: str = "float32"
    # "auto": bfloat16 on a GPU, float32 on a CPU (where XLA emulates bf16 matmuls slowly).
    compute_dtype: str = "auto"
    attention_backend: str = "auto"
    rope_scaling: str | None = None
    rope_factor: float = 1.0

    def __post_init__(self):
        _check(
            self.init in ("pretrained", "random"),
            f"model.init={self.init!r} is not 'pretrained' or 'random'",
        )
        _check(self.param_dtype in DTYPES, f"model.param_dtype={self.param_dtype!r} is unknown")
        _check(
            self.compute_dtype == "auto" or self.compute_dtype in DTYPES,
            f"model.compute_dtype={self.compute_dtype!r} is unknown",
        )
        _check(
            self.attention_backend in ATTENTION_BACKENDS,
            f"model.attention_backend={self.attention_backend!r} is not one of "
            f"{ATTENTION_BACKENDS}",
        )
        _check(
            self.rope_scaling is None or self.rope_scaling in ROPE_SCALINGS,
            f"model.rope_scaling={self.rope_scaling!r} is not one of {ROPE_SCALINGS}",
        )
        _check(self.rope_factor >= 1.0, f"model.rope_factor must be >= 1, got {self.rope_factor}")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Optimisation. `steps` counts optimizer updates; each sees `batch_size * grad_accum`
    sequences of `seq_len` tokens."""

    method: str = "lora"  # "lora" (adapters only) or "full"
    seq_len: int = 1024
    batch_size: int = 1
    grad_accum: int = 1
    steps: int = 100
    learning_rate: float = 2e-5
    schedule: str = "constant"
    warmup_steps: int = 20
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    remat: str = "full"
    loss_chunk_size: int = 2048  # 0: full [T, V] logits (for comparison)
    seed: int = 0
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    log_every: int = 1

    def __post_init__(self):
        _check(self.method in ("lora", "full"), f"train.method={self.method!r} is not lora/full")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name} must be at least 1")
        _check(self.seq_len >= 2, "train.seq_len must be at least 2")
        _check(self.learning_rate > 0, "train.learning_rate must be positive")
        _check(self.schedule in SCHEDULES, f"train.schedule={self.schedule!r} not in {SCHEDULES}")
        _check(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _check(
            0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1, "train.adam_b1/b2 must be in [0, 1)"
        )
        _check(self.clip_norm >= 0, "train.clip_norm must be >= 0 (0 disables clipping)")
        _check(
            self.remat in REMAT_POLICIES,
            f"train.remat={self.remat!r} is not one of {REMAT_POLICIES}",
        )
        _check(self.loss_chunk_size >= 0, "train.loss_chunk_size must be >= 0 (0: no chunking)")
        _check(self.eval_every >= 0, "train.eval_every must be >= 0")
        _check(self.seed >= 0, "train.seed must be >= 0")


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training text: "builtin" (the built-in corpus) or comma-separated files/globs."""

    train: str = "builtin"
    # "builtin", files, "holdout" (the tail of the training data), or "auto": the built-in
    # validation split when training on the built-in corpus, a holdout otherwise.
    validation: str = "auto"
    holdout_fraction: float = 0.05
    cache_dir: str = "~/.cache/lemo_jax/tokens"

    def __post_init__(self):
        _check(bool(self.train.strip()), "data.train must name the training data")
        _check(bool(self.validation.strip()), "data.validation must not be empty")
        _check(0 < self.holdout_fraction < 1, "data.holdout_fraction must be in (0, 1)")

    @property
    def resolved_validation(self) -> str:
        if self.validation.strip().lower() != "auto":
            return self.validation
        is_builtin = self.train.strip().lower() in ("builtin", "default")
        return "builtin" if is_builtin else "holdout"


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 100  # steps between checkpoints (the last step is always saved)
    keep: int = 2

    def __post_init__(self):
        _check(self.every >= 1, "checkpoint.every must be at least 1")
        _check(self.keep >= 1, "checkpoint.keep must be at least 1")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """How a run spreads over devices: a `data` x `fsdp` mesh (`lemo_jax/train/sharding.py`).

    Each size is a positive integer or "auto" (the devices the other axis leaves; at most one
    axis may be "auto"). The default puts every device on `fsdp`: weights and optimizer state
    are sharded over all devices, and every batch is split over all devices whatever the
    shape, so `fsdp` only trades memory for all-gathers and `data` the other way round.
    """

    data: str = "1"
    fsdp: str = "auto"

    def __post_init__(self):
        for name in ("data", "fsdp"):
            value = getattr(self, name).strip().lower()
            _check(
                value == "auto" or (value.isdigit() and int(value) >= 1),
                f"mesh.{name}={getattr(self, name)!r} is not a positive integer or 'auto'",
            )
        _check(
            not (self.data.strip().lower() == "auto" and self.fsdp.strip().lower() == "auto"),
            "mesh.data and mesh.fsdp cannot both be 'auto'",
        )

    def shape(self, device_count: int) -> tuple[int, int]:
        """(data, fsdp) for `device_count` devices; ValueError if they do not fit."""
        sizes = [getattr(self, name).strip().lower() for name in ("data", "fsdp")]
        fixed = math.prod(int(size) for size in sizes if size != "auto")
        present = f"{device_count} are present"
        where = f"mesh.data={self.data} x mesh.fsdp={self.fsdp}"
        _check(device_count % fixed == 0, f"{where} needs a multiple of {fixed} devices; {present}")
        data, fsdp = (device_count // fixed if size == "auto" else int(size) for size in sizes)
        _check(data * fsdp == device_count, f"{where} needs {data * fsdp} devices; {present}")
        return data, fsdp


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str
    output_dir: str
    model: ModelSection = ModelSection()
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    train: TrainSection = TrainSection()
    data: DataSection = DataSection()
    checkpoint: CheckpointSection = CheckpointSection()
    lemo: LemoConfig = dataclasses.field(default_factory=LemoConfig)
    mesh: MeshSection = MeshSection()
    export_after: bool = False  # write a Hugging Face model to OUTPUT_DIR/hf at the end
    perplexity_before_after: bool = False  # dense validation perplexity before and after

    def __post_init__(self):
        _check(
            not self.lemo.enabled or self.lemo.dense_final_steps < self.train.steps,
            f"lemo.dense_final_steps={self.lemo.dense_final_steps} must be less than "
            f"train.steps={self.train.steps} (some steps must eliminate tokens)",
        )
