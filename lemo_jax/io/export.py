"""Export to Hugging Face: a merged `LlamaForCausalLM` directory, or a PEFT LoRA adapter.

Names and transposes come from the one table in `hf_names`. Exports are atomic: everything is
written into a hidden sibling directory that is renamed onto `out_dir` only when complete, so an
interrupted export leaves nothing at `out_dir`, and an existing `out_dir` is never overwritten.

Host memory: tensors are brought to the host one layer at a time (merged in float32 on the
device), so the peak is the exported state dict in the target dtype plus one float32 layer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from lemo_jax.errors import UserError
from lemo_jax.io.hf_config import hf_config_from_model_config
from lemo_jax.io.hf_names import GLOBAL_TENSORS, LAYER_TENSORS, hf_tensors_for
from lemo_jax.model.llama import Llama

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merged_state_dict(model: Llama, *, dtype: str = "bfloat16") -> dict[str, torch.Tensor]:
    """The Hugging Face `LlamaForCausalLM` state dict of `model`, LoRA adapters merged.

    Each adapted kernel becomes W + (alpha / r) A B, computed in float32 and then cast to
    `dtype`. Per-layer tensors are un-stacked along [L]; with tied embeddings there is no
    `lm_head.weight`. Keys are in Hugging Face's module order (embedding, layer 0, layer 1, ...),
    so each shard of a sharded save holds whole consecutive layers.
    """
    torch_dtype = _torch_dtype(dtype)
    state: dict[str, torch.Tensor] = {}
    for path, variable in base_parameters(model):
        owner = owner_module(model, path)
        use_lora = path[-1] == "kernel" and getattr(owner, "lora_a", None) is not None
        stacked = path[0] == "layers"
        for index, tensor in enumerate(hf_tensors_for(path, model.config.num_layers)):
            value = variable[...][index] if stacked else variable[...]
            if use_lora:
                lora_a = owner.lora_a[...][index] if stacked else owner.lora_a[...]
                lora_b = owner.lora_b[...][index] if stacked else owner.lora_b[...]
                value = _merge(value, lora_a, lora_b, owner.lora_scale)
            state[tensor.name] = _to_torch(value, torch_dtype, transpose=tensor.transpose)
    return {name: state[name] for name in sorted(state, key=_hf_order)}


def export_hf(
    model: Llama,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    tokenizer: Any = None,
    max_shard_size: int | str = "2GB",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Writes `model` (LoRA merged) as a directory `LlamaForCausalLM.from_pretrained` loads.

    The directory holds `config.json` (architecture, RoPE scaling, `dtype`), safetensors shards of
    at most `max_shard_size` (with `model.safetensors.index.json` when there are several), and
    the tokenizer files when `tokenizer` is given. Token ids default to the tokenizer's.
    Returns `out_dir`; raises `UserError` if it already exists.
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    _torch_dtype(dtype)
    if tokenizer is not None:
        bos_token_id = tokenizer.bos_token_id if bos_token_id is None else bos_token_id
        eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    hf_config = hf_config_from_model_config(
        model.config, bos_token_id=bos_token_id, eos_token_id=eos_token_id
    )
    hf_config.dtype = TORCH_DTYPES[dtype]
    with atomic_directory(out_dir) as staging:
        hf_config.save_pretrained(staging)
        if bos_token_id is not None or eos_token_id is not None:
            GenerationConfig.from_model_config(hf_config).save_pretrained(staging)
        save_torch_state_dict(
            merged_state_dict(model, dtype=dtype),
            staging,
            max_shard_size=max_shard_size,
            metadata={"format": "pt"},
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return out_dir


def export_peft_adapter(
    model: Llama, out_dir: str | Path, *, base_model_name_or_path: str, tokenizer: Any = None
) -> Path:
    """Writes the LoRA adapters of `model` as a PEFT adapter directory.

    `PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), out_dir)` then computes
    what `model` computes. Tensors keep the adapters' parameter dtype. Raises `UserError` if the
    model has no adapters, if it also trains embeddings and norms (not representable in a plain
    adapter), or if `out_dir` already exists.
    """
    lora = model.lora
    if lora is None:
        raise UserError(
            "the model has no LoRA adapters, so there is no PEFT adapter to export; "
            "use export_hf to export the full model"
        )
    if lora.train_embeddings_and_norms:
        raise UserError(
            "the model also trained its embeddings and norms (lora.train_embeddings_and_norms), "
            "which a PEFT LoRA adapter cannot hold: export the merged model with export_hf instead"
        )
    try:
        import peft
    except ImportError:
        raise UserError(
            "exporting a PEFT adapter needs the peft package: pip install peft"
        ) from None
    from safetensors.torch import save_file

    peft_config = peft.LoraConfig(
        r=lora.rank,
        # PEFT's field is typed int; keep whole numbers whole so the JSON reads as PEFT writes it.
        lora_alpha=int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=sorted(lora.targets),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        peft_config.save_pretrained(staging)
        save_file(
            peft_state_dict(model), staging / "adapter_model.safetensors", metadata={"format": "pt"}
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return out_dir


def peft_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """PEFT's tensors for the adapters of `model`.

    Our `lora_a` [in, r] and `lora_b` [r, out] become `<module>.lora_A.weight` [r, in] and
    `<module>.lora_B.weight` [out, r] under PEFT's `base_model.model.` prefix, where `<module>` is
    the Hugging Face name of the adapted kernel without `.weight` (from the name table).
    """
    state: dict[str, torch.Tensor] = {}
    for path, _ in base_parameters(model):
        owner = owner_module(model, path)
        if path[-1] != "kernel" or getattr(owner, "lora_a", None) is None:
            continue
        dtype = TORCH_DTYPES[jnp.dtype(owner.lora_a[...].dtype).name]
        stacked = path[0] == "layers"
        for index, tensor in enumerate(hf_tensors_for(path, model.config.num_layers)):
            module = "base_model.model." + tensor.name.removesuffix(".weight")
            for ours, theirs in ((owner.lora_a, "lora_A"), (owner.lora_b, "lora_B")):
                value = ours[...][index] if stacked else ours[...]
                state[f"{module}.{theirs}.weight"] = _to_torch(value, dtype, transpose=True)
    return state


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yields an empty staging directory beside `out_dir`, renamed onto `out_dir` on success.

    On any exception (interrupts included) the staging directory is deleted and `out_dir` is left
    as it was. A hard kill can leave a hidden `.NAME.partial-*` sibling, never a partial `out_dir`.
    """
    if out_dir.exists() or out_dir.is_symlink():
        raise UserError(
            f"{out_dir} already exists; export never overwrites: choose a new directory"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        if out_dir.exists():  # created by someone else while we were writing
            raise UserError(f"{out_dir} appeared during the export; not overwriting it")
        _apply_umask(staging)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _apply_umask(directory: Path) -> None:
    """Gives written files the usual permissions: some writers create them through private
    temporary files (mode 0600), which would leave an export unreadable to other users."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in TORCH_DTYPES:
        raise UserError(f"export dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


def base_parameters(model: Llama) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    """(path, variable) of every base parameter; LoRA parameters (a `Param` subclass) excluded."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return [(tuple(str(p) for p in path), v) for path, v in nnx.to_flat_state(state)]


def owner_module(model: Llama, path: tuple[str, ...]) -> nnx.Module:
    module = model
    for name in path[:-1]:
        module = getattr(module, name)
    return module


@jax.jit
def _merge(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
    # float32 with full-precision matmuls: a bf16 product would round the update before it is
    # added, and on GPUs XLA's default float32 matmul may be TF32.
    update = jnp.matmul(
        lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )  # [in, r] @ [r, out] -> [in, out]
    return kernel.astype(jnp.float32) + scale * update


def _to_torch(value: jax.Array, dtype: torch.dtype, *, transpose: bool) -> torch.Tensor:
    # numpy has no bfloat16: go through a float32 host copy (np.array copies, so the tensor owns
    # its memory and shares storage with no other tensor) and let torch round to `dtype`.
    host = torch.from_numpy(np.array(value, dtype=np.float32))
    if transpose:
        host = host.T
    return host.to(dtype).contiguous()


_LAYER_ORDER = {entry.name: rank for rank, entry in enumerate(LAYER_TENSORS.values())}
_GLOBAL_ORDER = {entry.name: rank for rank, entry in enumerate(GLOBAL_TENSORS.values())}


def _hf_order(name: str) -> tuple[int, int, int]:
    """Sort key: embedding, then layers by index in the table's order, then norm and head."""
    if name.startswith("model.layers."):
        index, suffix = name.removeprefix("model.layers.").split(".", 1)
        return (1, int(index), _LAYER_ORDER[suffix])
    rank = _GLOBAL_ORDER[name]
    return (0 if rank == 0 else 2, 0, rank)
