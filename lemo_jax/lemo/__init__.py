"""LeMo contextual token sparsity: fewer tokens take part in each layer of long-context training.

LeMo (Wang et al. 2025, published as JENGA at USENIX ATC '25) observes that which tokens matter
varies by input and by layer, and that deeper layers hold many uninformative ones (paper section
1). It scores 64-token blocks by their attention logits (section 2, eq. 1-2), keeps the top blocks
of each layer and removes the rest from that layer entirely: eliminated tokens are neither queries
nor keys, pass through on the residual unchanged, and so store no activations, which is where the
memory saving comes from. We fix each layer's number of kept blocks at trace time, as the paper's
artifact does with per-layer keep ratios (sections 2 and 7): `config` holds the settings and
`budgets` turns them into per-layer static budgets and the groups of layers the model scans.
Sparsity is for training only; evaluation and export run dense.
"""

from lemo_jax.lemo.budgets import (
    LayerBudgets,
    LayerGroup,
    attention_keep_ratios,
    layer_budgets,
    mlp_keep_ratios,
    read_schedule_file,
    write_schedule_file,
)
from lemo_jax.lemo.config import LemoConfig

__all__ = [
    "LayerBudgets",
    "LayerGroup",
    "LemoConfig",
    "attention_keep_ratios",
    "layer_budgets",
    "mlp_keep_ratios",
    "read_schedule_file",
    "write_schedule_file",
]
