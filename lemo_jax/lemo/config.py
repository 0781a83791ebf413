"""`LemoConfig`, the `lemo` section of a run: where and how much LeMo eliminates tokens.

A schedule names one keep ratio per layer (the fraction of 64-token blocks a layer keeps):

- `paper_e2e`: the rule of the paper's end-to-end runs (section 2): for 32 layers, layers 0..14
  and 31 keep everything and layers 15..30 keep 40%; other depths keep the proportions.
- `paper_table`: the paper's measured per-layer table (attention or MLP, section 2), stretched
  to the model's depth by linear interpolation over relative depth.
- `uniform:RATIO`: every layer keeps RATIO, 0 < RATIO <= 1 (`uniform:1` eliminates nothing).
- `file:PATH`: ratios from a JSON file written by calibration; format in `lemo/budgets.py`.

`lemo_jax.lemo.budgets` turns a schedule into static per-layer block budgets (paper section 7).
"""

from __future__ import annotations

import dataclasses

from lemo_jax.model.attention import has_ampere_gpu
from lemo_jax.model.remat import REMAT_POLICIES

SCHEDULE_FORMS = ("paper_e2e", "paper_table", "uniform:RATIO", "file:PATH")
MLP_MODES = ("dense", "token_sparse")
SCORERS = ("oracle", "predictor")
PREDICTOR_ARCHITECTURES = ("pooled", "chunks", "heads")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A parsed schedule string: `kind` is paper_e2e, paper_table, uniform (with `ratio`) or
    file (with `path`)."""

    kind: str
    ratio: float | None = None
    path: str | None = None


def parse_schedule(text: str, field: str) -> Schedule:
    """Parses the schedule `text` of field `lemo.<field>`; a malformed one is a ValueError whose
    one-line message names the field. A file is only named here, and read by the budgets."""
    where = f"lemo.{field}={text!r}"
    name, colon, argument = text.partition(":")
    if not colon and name in ("paper_e2e", "paper_table"):
        return Schedule(name)
    if colon and name == "uniform":
        try:
            ratio = float(argument)
        except ValueError:
            raise ValueError(f"{where}: the ratio must be a number in (0, 1]") from None
        _check(0 < ratio <= 1, f"{where}: the ratio must be in (0, 1]")  # also rejects nan
        return Schedule("uniform", ratio=ratio)
    if colon and name == "file":
        _check(bool(argument.strip()), f"{where}: the file path is empty")
        return Schedule("file", path=argument)
    raise ValueError(f"{where} is not one of {', '.join(SCHEDULE_FORMS)}")


KERNELS = ("auto", "pallas", "xla")


# Ops for which "auto" picks the Pallas kernel on a GPU: those measured faster than XLA on the
# H200 (BENCHMARKS.md, "Sparse-path kernels"): block scores 7.1x at 64K tokens; the row kernels
# (selective load, in-place residual add) 1.2x and 1.15x at 64K, equal within noise at 16K.
AUTO_PALLAS_OPS = frozenset({"block_scores", "rows"})


def resolve_kernels(config: LemoConfig, op: str = "block_scores") -> str:
    """The implementation of `op` ("block_scores", "rows"): "auto" -> "pallas" on a GPU for
    the ops in AUTO_PALLAS_OPS (when the block size suits the kernels), else "xla"."""
    if config.kernels != "auto":
        return config.kernels
    power_of_two = config.block_size & (config.block_size - 1) == 0
    return "pallas" if power_of_two and op in AUTO_PALLAS_OPS and has_ampere_gpu() else "xla"


@dataclasses.dataclass(frozen=True)
class LemoConfig:
    """LeMo token elimination (paper section 2) with static per-layer budgets (section 7).

    `LemoConfig()` is disabled: the model reads `enabled` and runs dense when it is false. The
    budget functions describe the schedule whatever `enabled` says.
    """

    enabled: bool = False
    # Tokens per block, the unit of scoring and elimination (64 in the paper). A multiple of 16
    # so kept blocks fill whole tensor-core and Pallas tiles.
    block_size: int = 64
    schedule: str = "paper_e2e"  # attention keep ratios, see the module docstring
    # "dense": every token goes through every MLP, as in the paper's artifact. "token_sparse":
    # the MLP also drops tokens (paper section 2), with budgets from `mlp_schedule`, where
    # `paper_table` means the paper's MLP table.
    mlp: str = "dense"
    mlp_schedule: str = "paper_table"
    # Budgets are rounded up to a multiple of this many blocks, so a deep model compiles few
    # distinct shapes and the kept length R stays tile-aligned.
    bucket_blocks: int = 4
    # How blocks are scored: "oracle" computes the exact attention block scores (paper eq. 1-2);
    # "predictor" uses the trained per-layer predictors in `predictor_path` (paper section 4.3).
    scorer: str = "oracle"
    predictor_path: str | None = None
    # Predictor networks (lemo_jax.lemo.predictor): "pooled" (per-token low-rank projections
    # pooled over each block; the default: better recall at a third of the cost) or "chunks"
    # (the paper artifact's head-dim chunks with each block's tokens concatenated) or "heads"
    # (no network: the oracle over a few query heads per layer chosen offline, from the layer's
    # own frozen projections; see the predictor module).
    predictor_architecture: str = "pooled"
    # Query heads per layer of the "heads" predictors: each costs about 1 / num_heads of the
    # oracle scorer (2 heads measured at 1.1% of a Llama-2-7B step at 64K, the oracle 11.5%).
    # Read when selecting them and for untrained ones (benchmarks); a saved selection keeps
    # its own count.
    predictor_heads: int = 2
    # The first blocks are always kept in attention (a token-sparse MLP selects single tokens
    # by their own activation and forces none): the first tokens
    # are attention sinks that take a large share of every later query's attention whatever
    # their content (Xiao et al. 2023), so dropping them would re-normalise all kept queries.
    # The causal oracle already favours block 0 (every query block scores it), so forcing it
    # rarely changes a selection, but it makes it certain. No budget falls below this.
    keep_first_blocks: int = 1
    # Remat policy of layers that eliminate tokens; "same" follows train.remat. "none" keeps
    # their compacted [B, R, ...] activations instead of recomputing them (the paper's point:
    # the kept activations are small), while dense layers still follow train.remat.
    pruned_remat: str = "same"
    # How a key block's tile scores combine over query blocks: "sum" (paper eq. 2) or "mean"
    # over the query blocks that can see it causally (M - n of them for block n). The causal sum
    # favours early blocks simply because more queries see them.
    score_reduction: str = "sum"
    # Implementation of the sparse-path ops (block scoring, selective load, in-place residual
    # add): "pallas" (fused kernels; Triton on a GPU, interpreted elsewhere), "xla" (jnp), or
    # "auto": Pallas on a GPU for the ops measured faster there (AUTO_PALLAS_OPS), else XLA.
    kernels: str = "auto"
    # A layer whose attention budget differs from both neighbours' (paper_e2e's dense last
    # layer) takes a neighbour's layer into its scan group, which then runs at the larger
    # budget: XLA inlines a one-trip scan, and several inlined layers' buffers were scheduled
    # to live at once (`merge_single_layer_groups`). False runs such a layer on its own, so
    # its neighbour keeps eliminating.
    merge_lone_layers: bool = True
    # The last this many training steps run dense (no elimination), so the adapters end on the
    # dense forward pass they are evaluated and served with; fewer than train.steps. Training
    # with elimination and evaluating densely is a mismatch (DeepSpeed's random-LTD likewise
    # grows its kept length back to the full sequence over training); the dense steps cost
    # the dense step's time and memory. 0: every step eliminates.
    dense_final_steps: int = 0

    def __post_init__(self):
        _check(
            self.block_size > 0 and self.block_size % 16 == 0,
            f"lemo.block_size={self.block_size} must be a positive multiple of 16",
        )
        parse_schedule(self.schedule, "schedule")
        _check(self.mlp in MLP_MODES, f"lemo.mlp={self.mlp!r} is not one of {MLP_MODES}")
        # Checked even while the MLP is dense, so a typo fails where it is written.
        parse_schedule(self.mlp_schedule, "mlp_schedule")
        _check(
            self.bucket_blocks >= 1, f"lemo.bucket_blocks={self.bucket_blocks} must be at least 1"
        )
        _check(self.scorer in SCORERS, f"lemo.scorer={self.scorer!r} is not one of {SCORERS}")
        _check(
            self.predictor_architecture in PREDICTOR_ARCHITECTURES,
            f"lemo.predictor_architecture={self.predictor_architecture!r} is not one of "
            f"{PREDICTOR_ARCHITECTURES}",
        )
        _check(
            self.predictor_heads >= 1,
            f"lemo.predictor_heads={self.predictor_heads} must be at least 1",
        )
        _check(
            self.scorer != "predictor" or bool(self.predictor_path),
            "lemo.scorer=predictor needs lemo.predictor_path=DIR "
            "(predictors trained with scripts/train_predictor.py)",
        )
        _check(
            self.score_reduction in ("sum", "mean"),
            f"lemo.score_reduction={self.score_reduction!r} is not 'sum' or 'mean'",
        )
        _check(
            self.pruned_remat == "same" or self.pruned_remat in REMAT_POLICIES,
            f"lemo.pruned_remat={self.pruned_remat!r} is not 'same' or one of {REMAT_POLICIES}",
        )
        _check(
            self.kernels in KERNELS,
            f"lemo.kernels={self.kernels!r} is not one of {KERNELS}",
        )
        _check(
            self.kernels != "pallas" or self.block_size & (self.block_size - 1) == 0,
            f"lemo.kernels=pallas needs a power-of-two lemo.block_size, got {self.block_size}",
        )
        _check(
            self.dense_final_steps >= 0,
            f"lemo.dense_final_steps={self.dense_final_steps} must be >= 0",
        )
        _check(
            self.keep_first_blocks >= 0,
            f"lemo.keep_first_blocks={self.keep_first_blocks} must be >= 0",
        )
