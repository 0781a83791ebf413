"""Static per-layer budgets for LeMo token elimination, and the layer groups the model scans.

The paper tunes a threshold per layer; its artifact instead keeps a fixed fraction of 64-token
blocks per layer with top-k (paper section 2). We do the same with budgets fixed at trace time
(section 7.1): layer l keeps `M_l` of the `M = seq_len / block_size` blocks, where

    M_l = clamp(round_up(ceil(ratio_l * M), bucket_blocks), max(1, keep_first_blocks), M)

A layer with `M_l == M` is dense: the model runs it without elimination. Consecutive layers with
equal budgets form a `LayerGroup`, run as one `lax.scan`, so the number of groups bounds the
number of distinct layer shapes XLA compiles.

Schedule files (`file:PATH`, written by calibration with `write_schedule_file`) hold one JSON
object:

    {"attention": [ratio per layer], "mlp": [ratio per layer], "source": ...}

`attention` is required and read by `lemo.schedule`; `mlp` is optional and read by
`lemo.mlp_schedule`; each list has one keep ratio in (0, 1] per layer, layer 0 first. `source` is
free-form JSON describing how the ratios were measured; other keys are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lemo_jax.errors import UserError
from lemo_jax.files import write_text_atomically
from lemo_jax.lemo.config import LemoConfig, Schedule, parse_schedule, resolve_kernels
from lemo_jax.lemo.layer import EliminationPlan, GroupPlan

# Paper section 2, Llama-2-7B, keep fraction per layer 0..31 (mean eliminated 38.2% and 51.0%).
PAPER_ATTENTION_TABLE = (
    0.99, 0.97, 0.95, 0.92, 0.92, 0.88, 0.86, 0.79, 0.78, 0.73, 0.71, 0.69, 0.64, 0.62, 0.61, 0.57,
    0.53, 0.52, 0.50, 0.43, 0.44, 0.43, 0.42, 0.41, 0.45, 0.42, 0.40, 0.40, 0.44, 0.43, 0.44, 0.49,
)  # fmt: skip
PAPER_MLP_TABLE = (
    0.53, 0.41, 0.46, 0.44, 0.55, 0.54, 0.58, 0.42, 0.48, 0.41, 0.44, 0.50, 0.41, 0.44, 0.53, 0.51,
    0.44, 0.52, 0.56, 0.40, 0.56, 0.54, 0.47, 0.43, 0.59, 0.47, 0.42, 0.42, 0.57, 0.52, 0.56, 0.55,
)  # fmt: skip
# The end-to-end rule for 32 layers: 15 dense layers, 16 keeping 40%, a dense last layer.
PAPER_E2E_DENSE_FRACTION = 15 / 32
PAPER_E2E_RATIO = 0.4


def paper_e2e_ratios(num_layers: int) -> list[float]:
    """The first round(15/32 * L) layers (halves round up) and the last layer keep everything;
    the layers between keep 40%. Exact for L=32; L=30 gives 14 dense, 15 sparse, 1 dense."""
    dense_prefix = math.floor(num_layers * PAPER_E2E_DENSE_FRACTION + 0.5)
    return [
        1.0 if layer < dense_prefix or layer == num_layers - 1 else PAPER_E2E_RATIO
        for layer in range(num_layers)
    ]


def stretch_table(table: Sequence[float], num_layers: int) -> list[float]:
    """Layer l of L takes the table's value at relative depth l / (L - 1), linearly
    interpolated; exact when L equals the table length, the end layers always match."""
    positions = np.linspace(0, len(table) - 1, num_layers)
    return [float(value) for value in np.interp(positions, np.arange(len(table)), table)]


def _check_ratios(values: object, key: str, num_layers: int, where: str) -> list[float]:
    if not isinstance(values, list):
        raise UserError(f"{where} has no {key!r} list of per-layer keep ratios")
    if len(values) != num_layers:
        raise UserError(
            f"{where} has {len(values)} {key} ratios but the model has {num_layers} layers"
        )
    for layer, value in enumerate(values):
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (is_number and 0 < value <= 1):
            raise UserError(f"{where}: {key}[{layer}]={value!r} is not a keep ratio in (0, 1]")
    return [float(value) for value in values]


def read_schedule_file(path: str, key: str, num_layers: int, where: str = "") -> list[float]:
    """The `key` ("attention" or "mlp") ratios of schedule file `path`; UserError if unusable."""
    where = f"{where}: {path}" if where else path
    try:
        with open(Path(path).expanduser()) as file:
            content = json.load(file)
    except OSError as error:
        raise UserError(f"{where} cannot be read: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{where} is not valid JSON: {error}") from None
    values = content.get(key) if isinstance(content, dict) else None
    return _check_ratios(values, key, num_layers, where)


def write_schedule_file(
    path: str,
    attention: Sequence[float],
    mlp: Sequence[float] | None = None,
    source: object = None,
) -> None:
    """Writes a schedule file that `file:PATH` schedules read back."""
    content: dict[str, object] = {
        "attention": _check_ratios(list(attention), "attention", len(attention), path)
    }
    if mlp is not None:
        content["mlp"] = _check_ratios(list(mlp), "mlp", len(attention), path)
    if source is not None:
        content["source"] = source
    write_text_atomically(Path(path).expanduser(), json.dumps(content, indent=2) + "\n")


def _keep_ratios(
    schedule: Schedule, field: str, table: Sequence[float], key: str, num_layers: int
) -> list[float]:
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be at least 1")
    if schedule.kind == "paper_e2e":
        return paper_e2e_ratios(num_layers)
    if schedule.kind == "paper_table":
        return stretch_table(table, num_layers)
    if schedule.kind == "uniform":
        return [schedule.ratio] * num_layers
    where = f"lemo.{field}='file:{schedule.path}'"
    return read_schedule_file(schedule.path, key, num_layers, where)


def attention_keep_ratios(config: LemoConfig, num_layers: int) -> list[float]:
    """Per-layer fraction of blocks each attention keeps under `lemo.schedule`."""
    schedule = parse_schedule(config.schedule, "schedule")
    return _keep_ratios(schedule, "schedule", PAPER_ATTENTION_TABLE, "attention", num_layers)


def mlp_keep_ratios(config: LemoConfig, num_layers: int) -> list[float]:
    """Per-layer fraction of blocks each MLP keeps: all 1.0 when `lemo.mlp` is dense, otherwise
    `lemo.mlp_schedule` (where `paper_table` is the paper's MLP table)."""
    if config.mlp == "dense":
        return [1.0] * num_layers
    schedule = parse_schedule(config.mlp_schedule, "mlp_schedule")
    return _keep_ratios(schedule, "mlp_schedule", PAPER_MLP_TABLE, "mlp", num_layers)


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Layers [start, stop) with equal budgets, which the model runs as one `lax.scan`.

    `attention_blocks` is M_l (equal to `num_blocks` when attention is dense); `mlp_blocks` is
    None where the MLP runs dense (`lemo.mlp="dense"`, or a budget of every block).
    """

    start: int
    stop: int
    attention_blocks: int
    mlp_blocks: int | None
    num_blocks: int

    @property
    def num_layers(self) -> int:
        return self.stop - self.start

    @property
    def is_attention_dense(self) -> bool:
        return self.attention_blocks == self.num_blocks

    @property
    def is_dense(self) -> bool:
        """Nothing is eliminated: the model runs these layers exactly as without LeMo."""
        return self.is_attention_dense and self.mlp_blocks is None


@dataclasses.dataclass(frozen=True)
class LayerBudgets:
    """Kept blocks per layer for one sequence length; `mlp_blocks[l]` is None for a dense MLP."""

    seq_len: int
    block_size: int
    attention_blocks: tuple[int, ...]
    mlp_blocks: tuple[int | None, ...]

    @property
    def num_blocks(self) -> int:
        return self.seq_len // self.block_size

    @property
    def num_layers(self) -> int:
        return len(self.attention_blocks)

    def groups(self) -> list[LayerGroup]:
        """Maximal runs of consecutive layers with equal (attention, MLP) budgets, in order;
        together they cover layers [0, L) without gaps."""
        groups: list[LayerGroup] = []
        pairs = zip(self.attention_blocks, self.mlp_blocks, strict=True)
        for layer, (attention, mlp) in enumerate(pairs):
            if groups and (groups[-1].attention_blocks, groups[-1].mlp_blocks) == (attention, mlp):
                groups[-1] = dataclasses.replace(groups[-1], stop=layer + 1)
            else:
                groups.append(LayerGroup(layer, layer + 1, attention, mlp, self.num_blocks))
        return groups

    def kept_fraction(self, sublayer: str = "attention") -> tuple[list[float], float]:
        """(per layer, overall) fraction of tokens that take part in each layer's attention or
        MLP. Every layer sees seq_len tokens, so the token-weighted overall is their mean."""
        if sublayer not in ("attention", "mlp"):
            raise ValueError(f"{sublayer=} is not 'attention' or 'mlp'")
        blocks = self.attention_blocks if sublayer == "attention" else self.mlp_blocks
        per_layer = [
            (self.num_blocks if kept is None else kept) / self.num_blocks for kept in blocks
        ]
        return per_layer, sum(per_layer) / len(per_layer)

    def summary(self) -> str:
        """One line for logs, e.g. `3 layer groups of 1024 blocks: 0-14 dense; 15-30 attention
        412; 31 dense`."""
        parts = []
        for group in self.groups():
            layers = f"{group.start}-{group.stop - 1}" if group.num_layers > 1 else f"{group.start}"
            kept = [] if group.is_attention_dense else [f"attention {group.attention_blocks}"]
            kept += [] if group.mlp_blocks is None else [f"mlp {group.mlp_blocks}"]
            parts.append(f"{layers} {' '.join(kept) or 'dense'}")
        return f"{len(parts)} layer groups of {self.num_blocks} blocks: {'; '.join(parts)}"


def _budget(ratio: float, num_blocks: int, config: LemoConfig) -> int:
    # round() before ceil(): 0.3 * 10 is 3.0000000000000004 in floating point.
    wanted = math.ceil(round(ratio * num_blocks, 6))
    bucketed = -(-wanted // config.bucket_blocks) * config.bucket_blocks
    return min(max(bucketed, 1, config.keep_first_blocks), num_blocks)


def layer_budgets(config: LemoConfig, num_layers: int, seq_len: int) -> LayerBudgets:
    """Per-layer kept blocks of `config`'s schedules for sequences of `seq_len` tokens."""
    if seq_len < config.block_size or seq_len % config.block_size:
        raise UserError(
            f"train.seq_len={seq_len} is not a multiple of lemo.block_size={config.block_size}"
        )
    num_blocks = seq_len // config.block_size
    attention = [_budget(r, num_blocks, config) for r in attention_keep_ratios(config, num_layers)]
    mlp = [_budget(r, num_blocks, config) for r in mlp_keep_ratios(config, num_layers)]
    return LayerBudgets(
        seq_len=seq_len,
        block_size=config.block_size,
        attention_blocks=tuple(attention),
        # A dense MLP (by mode or by a full budget) is None, so the model has one test for it.
        mlp_blocks=tuple(
            None if config.mlp == "dense" or kept == num_blocks else kept for kept in mlp
        ),
    )


def elimination_plan(config: LemoConfig, num_layers: int, seq_len: int) -> EliminationPlan | None:
    """The model's static plan for a run, or None when LeMo is off or every layer is dense."""
    if not config.enabled:
        return None
    groups = layer_budgets(config, num_layers, seq_len).groups()
    if all(group.is_dense for group in groups):
        return None
    plans = [
        GroupPlan(
            group.start,
            group.stop,
            None if group.is_attention_dense else group.attention_blocks,
            group.mlp_blocks,
        )
        for group in groups
    ]
    return EliminationPlan(
        block_size=config.block_size,
        groups=merge_by_attention_runs(plans, merge_lone_layers=config.merge_lone_layers),
        keep_first_blocks=config.keep_first_blocks,
        pruned_remat=None if config.pruned_remat == "same" else config.pruned_remat,
        score_reduction=config.score_reduction,
        kernels=resolve_kernels(config, "block_scores"),
        row_kernels=resolve_kernels(config, "rows"),
        scorer=config.scorer,
    )


def executed_budgets(config: LemoConfig, num_layers: int, seq_len: int) -> LayerBudgets:
    """The budgets the model actually runs: `layer_budgets` as `elimination_plan` leaves them,
    after `merge_by_attention_runs` has raised a one-layer group's partner to the pair's larger
    budget. What logs and benchmarks report (kept fractions, the summary line)."""
    budgets = layer_budgets(config, num_layers, seq_len)
    plan = elimination_plan(config, num_layers, seq_len)
    if plan is None:
        return budgets
    attention, mlp = list(budgets.attention_blocks), list(budgets.mlp_blocks)
    for group in plan.groups:
        for layer in range(group.start, group.stop):
            attention[layer] = group.attention_blocks or budgets.num_blocks  # None: dense
            mlp[layer] = group.mlp_blocks
    return dataclasses.replace(budgets, attention_blocks=tuple(attention), mlp_blocks=tuple(mlp))


def _larger(first: int | None, second: int | None) -> int | None:
    return None if first is None or second is None else max(first, second)  # None: dense


def merge_by_attention_runs(
    groups: Sequence[GroupPlan], *, merge_lone_layers: bool = True
) -> tuple[GroupPlan, ...]:
    """`merge_single_layer_groups` in two levels, so that MLP budgets never cost attention
    sparsity: first over runs of equal attention budget (a lone layer's run borrows from or
    merges with a neighbouring run), then within each run over its MLP budgets.

    With a token-sparse MLP every layer may have its own MLP budget; merging those one-layer
    groups across an attention boundary made a pruned layer dense (for Llama-2-7B with
    `paper_e2e` and the paper's MLP table, 14 pruned layers instead of 15). With
    `merge_lone_layers` false, a run of one layer (such as `paper_e2e`'s dense last layer)
    stays a group of its own instead of taking a pruned neighbour's layer."""
    runs: list[GroupPlan] = []
    for group in groups:
        if runs and runs[-1].attention_blocks == group.attention_blocks:
            runs[-1] = dataclasses.replace(runs[-1], stop=group.stop)
        else:
            runs.append(GroupPlan(group.start, group.stop, group.attention_blocks, None))
    merged: list[GroupPlan] = []
    for run in merge_single_layer_groups(runs) if merge_lone_layers else runs:
        inside = [
            GroupPlan(
                max(group.start, run.start),
                min(group.stop, run.stop),
                run.attention_blocks,
                group.mlp_blocks,
            )
            for group in groups
            if group.start < run.stop and group.stop > run.start
        ]
        merged.extend(merge_single_layer_groups(inside))
    return tuple(merged)


def merge_single_layer_groups(groups: Sequence[GroupPlan]) -> tuple[GroupPlan, ...]:
    """Gives every one-layer group a second layer, with the larger budget of the two.

    XLA inlines a scan of one trip, and the inlined layers' buffers were then scheduled to live
    at once: measured on CPU (8 layers, 4,096 tokens, full remat), eight one-layer groups needed
    5.9x the temporary memory of one eight-layer group, while groups of two cost the same as one.
    A single layer borrows the adjacent layer of a neighbour of three or more layers; otherwise
    it merges with its shorter neighbour. Merged budgets are the larger of the two, so a layer
    keeps more tokens, never fewer. For `paper_e2e` this turns
    [0-14 dense][15-30 pruned][31 dense] into [0-14 dense][15-29 pruned][30-31 dense].
    """
    merged = list(groups)
    while len(merged) > 1:
        single = next((i for i, g in enumerate(merged) if g.stop - g.start == 1), None)
        if single is None:
            break
        neighbours = [i for i in (single - 1, single + 1) if 0 <= i < len(merged)]
        lengths = {i: merged[i].stop - merged[i].start for i in neighbours}
        long = [i for i in neighbours if lengths[i] >= 3]
        # Borrow from a long neighbour; otherwise merge with the shortest one, so that runs of
        # single layers pair up instead of growing one group that takes the largest budget.
        other = long[0] if long else min(neighbours, key=lengths.get)
        lone, neighbour = merged[single], merged[other]
        pair_attention = _larger(lone.attention_blocks, neighbour.attention_blocks)
        pair_mlp = _larger(lone.mlp_blocks, neighbour.mlp_blocks)
        if neighbour.stop - neighbour.start >= 3:  # borrow one layer
            if other < single:
                rest = dataclasses.replace(neighbour, stop=neighbour.stop - 1)
                pair = GroupPlan(neighbour.stop - 1, lone.stop, pair_attention, pair_mlp)
                merged[other : single + 1] = [rest, pair]
            else:
                rest = dataclasses.replace(neighbour, start=neighbour.start + 1)
                pair = GroupPlan(lone.start, neighbour.start + 1, pair_attention, pair_mlp)
                merged[single : other + 1] = [pair, rest]
        else:  # merge whole
            first, last = sorted((single, other))
            start, stop = merged[first].start, merged[last].stop
            merged[first : last + 1] = [GroupPlan(start, stop, pair_attention, pair_mlp)]
    return tuple(merged)
