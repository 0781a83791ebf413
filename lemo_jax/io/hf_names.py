"""The one table mapping lemo-jax parameter paths to Hugging Face Llama tensor names.

Our linear kernels are [in, out]; Hugging Face stores [out, in], so those entries transpose.
Per-layer parameters are stacked along a leading [L] axis here and numbered
`model.layers.{i}.` there.
"""

from __future__ import annotations

from typing import NamedTuple


class HFTensor(NamedTuple):
    name: str
    transpose: bool


# Paths under `layers` (stacked [L, ...]) -> suffix after `model.layers.{i}.`.
LAYER_TENSORS: dict[tuple[str, ...], HFTensor] = {
    ("attention_norm", "scale"): HFTensor("input_layernorm.weight", False),
    ("mlp_norm", "scale"): HFTensor("post_attention_layernorm.weight", False),
    **{
        ("attention", proj, "kernel"): HFTensor(f"self_attn.{proj}.weight", True)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
    },
    **{
        ("attention", proj, "bias"): HFTensor(f"self_attn.{proj}.bias", False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
    },
    **{
        ("mlp", proj, "kernel"): HFTensor(f"mlp.{proj}.weight", True)
        for proj in ("gate_proj", "up_proj", "down_proj")
    },
    **{
        ("mlp", proj, "bias"): HFTensor(f"mlp.{proj}.bias", False)
        for proj in ("gate_proj", "up_proj", "down_proj")
    },
}

# Paths at the top of the model -> full Hugging Face name.
GLOBAL_TENSORS: dict[tuple[str, ...], HFTensor] = {
    ("embedding", "table"): HFTensor("model.embed_tokens.weight", False),
    ("final_norm", "scale"): HFTensor("model.norm.weight", False),
    ("lm_head", "kernel"): HFTensor("lm_head.weight", True),
}


def hf_tensors_for(path: tuple[str, ...], num_layers: int) -> list[HFTensor]:
    """The Hugging Face tensors making up one of our parameters, one per layer if stacked."""
    if path[0] == "layers":
        entry = LAYER_TENSORS.get(path[1:])
        if entry is None:
            raise KeyError(f"no Hugging Face name for parameter {'/'.join(path)}")
        return [
            HFTensor(f"model.layers.{i}.{entry.name}", entry.transpose) for i in range(num_layers)
        ]
    entry = GLOBAL_TENSORS.get(path)
    if entry is None:
        raise KeyError(f"no Hugging Face name for parameter {'/'.join(path)}")
    return [entry]
