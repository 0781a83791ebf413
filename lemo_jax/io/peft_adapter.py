"""PEFT LoRA adapters in: the inverse of `export.export_peft_adapter`.

    lora = peft_lora_config(adapter_dir)                  # rank, alpha, targets of the adapter
    model = load_pretrained(base, lora=lora, ...)         # fresh adapters of that shape
    apply_peft_adapter(model, adapter_dir)                # now the adapter's weights

Any PEFT LoRA adapter of a Llama model with plain LoRA on linear projections loads (ours or one
trained with PEFT): `<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r] under
PEFT's `base_model.model.` prefix. Adapters with extra trained modules (`modules_to_save`),
DoRA, or per-module ranks are refused with a clear error rather than loaded half-way.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from lemo_jax.configs.model import LoraConfig
from lemo_jax.errors import UserError
from lemo_jax.io.export import base_parameters, owner_module
from lemo_jax.io.hf_names import hf_tensors_for
from lemo_jax.model.llama import Llama

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_lora_config(directory: str | Path, *, param_dtype: str = "float32") -> LoraConfig:
    """The `LoraConfig` of the PEFT adapter in `directory`."""
    path = Path(directory).expanduser() / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{directory} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    unsupported = [
        name
        for name in ("modules_to_save", "rank_pattern", "alpha_pattern", "use_dora")
        if config.get(name)
    ]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise UserError(
            f"{path}: only plain LoRA adapters load (found peft_type="
            f"{config.get('peft_type')!r}, {', '.join(unsupported) or 'no extra options'})"
        )
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise UserError(f"{path}: target_modules is a pattern ({targets!r}); list the modules")
    try:
        return LoraConfig(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            targets=tuple(sorted(targets)),
            param_dtype=param_dtype,
        )
    except KeyError as err:
        raise UserError(f"{path} has no {err.args[0]!r}") from None


def apply_peft_adapter(model: Llama, directory: str | Path) -> None:
    """Sets the LoRA weights of `model` (built with `peft_lora_config(directory)`) from the
    adapter in `directory`; every adapter tensor must be used and every model adapter set."""
    # Through torch: numpy has no bfloat16, in which adapters are often saved.
    from safetensors.torch import load_file

    weights_path = Path(directory).expanduser() / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"{directory} has no {ADAPTER_WEIGHTS}")
    lora = model.lora
    expected = peft_lora_config(directory, param_dtype=lora.param_dtype if lora else "float32")
    if lora is None or (lora.rank, lora.alpha, set(lora.targets)) != (
        expected.rank,
        expected.alpha,
        set(expected.targets),
    ):
        raise UserError(
            f"the adapter in {directory} (rank {expected.rank}, alpha {expected.alpha}, "
            f"{', '.join(expected.targets)}) does not match the model's LoRA "
            f"({'none' if lora is None else f'rank {lora.rank}, alpha {lora.alpha}'})"
        )
    tensors = load_file(str(weights_path))
    unused = set(tensors)
    for path, _ in base_parameters(model):
        owner = owner_module(model, path)
        if path[-1] != "kernel" or getattr(owner, "lora_a", None) is None:
            continue
        stacked = path[0] == "layers"
        for variable, theirs in ((owner.lora_a, "lora_A"), (owner.lora_b, "lora_B")):
            values = []
            for tensor in hf_tensors_for(path, model.config.num_layers):
                name = f"{PREFIX}{tensor.name.removesuffix('.weight')}.{theirs}.weight"
                if name not in tensors:
                    raise UserError(f"{weights_path} has no tensor {name}")
                unused.discard(name)
                # PEFT [r, in] / [out, r] -> ours [in, r] / [r, out]
                values.append(tensors[name].float().numpy().T)
            value = np.stack(values) if stacked else values[0]
            if value.shape != variable[...].shape:
                raise UserError(
                    f"{weights_path}: {theirs} of {'/'.join(path)} has shape {value.shape}, "
                    f"the model expects {variable[...].shape}"
                )
            variable[...] = jnp.asarray(value, variable[...].dtype)
    if unused:
        raise UserError(
            f"{weights_path} has {len(unused)} tensors this model has no place for, "
            f"e.g. {sorted(unused)[0]}"
        )
