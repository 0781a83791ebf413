"""`load_pretrained`: a Hugging Face checkpoint in, a `Llama` out.

The model is first built abstractly (`nnx.eval_shape`, no memory), then each parameter is filled
from the checkpoint one at a time: per-layer tensors are stacked into one host buffer for the [L]
axis, moved to the device, and the buffer freed. Peak host memory is one stacked parameter
(about 2.9 GB for Llama-2-7B's MLP in bf16), not the model. Under a mesh each buffer goes
straight onto its sharding (`lemo_jax.train.sharding`): every device receives only its own
shards, so no device ever holds the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lemo_jax.configs.model import DTYPES, LoraConfig, ModelConfig, RopeConfig
from lemo_jax.errors import UserError
from lemo_jax.io.hf_config import model_config_from_hf
from lemo_jax.io.hf_names import hf_tensors_for
from lemo_jax.io.sources import TensorReader, load_hf_config, open_tensors, resolve_source
from lemo_jax.model.llama import Llama
from lemo_jax.train.sharding import global_array, tree_shardings


def load_pretrained(
    path_or_name: str | Path,
    *,
    dtype: str = "float32",
    compute_dtype: str = "bfloat16",
    lora: LoraConfig | None = None,
    rope: RopeConfig | None = None,
    attention_backend: str = "auto",
    max_position_embeddings: int | None = None,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> Llama:
    """Loads a Llama-family model from a Hugging Face directory, a .gguf file or a built-in name.

    Args:
      path_or_name: a directory with `config.json` and safetensors (single or sharded with an
        index), a `.gguf` file, or a built-in name such as `smollm2-135m`.
      dtype: parameter dtype ("float32" or "bfloat16"); `compute_dtype` is the matmul dtype.
      lora: adapters to add (freshly initialised, so the output is unchanged).
      rope: replaces the checkpoint's RoPE settings (e.g. linear interpolation for longer context).
      seed: seeds the LoRA initialisation.
      mesh: places every parameter on its sharding under this mesh as it is read (on the
        default device without one).
    """
    source = resolve_source(path_or_name)
    hf_config = load_hf_config(source)
    overrides: dict[str, Any] = dict(
        param_dtype=dtype, compute_dtype=compute_dtype, attention_backend=attention_backend
    )
    if rope is not None:
        overrides["rope"] = rope
    if max_position_embeddings is not None:
        overrides["max_position_embeddings"] = max_position_embeddings
    config = model_config_from_hf(hf_config, **overrides)
    reader = open_tensors(source, hf_config)
    return build_from_tensors(
        config, reader, lora=lora, seed=seed, origin=str(path_or_name), mesh=mesh
    )


def pretrained_config(path_or_name: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint, without reading its weights."""
    return model_config_from_hf(load_hf_config(resolve_source(path_or_name)))


def build_from_tensors(
    config: ModelConfig,
    reader: TensorReader,
    *,
    lora: LoraConfig | None,
    seed: int,
    origin: str,
    mesh: Mesh | None = None,
) -> Llama:
    """A `Llama` whose base weights come from `reader` and whose LoRA weights are fresh; with
    `mesh`, each weight is placed on its sharding as it is read."""
    abstract = nnx.eval_shape(lambda: Llama(config, lora=lora, rngs=nnx.Rngs(seed)))
    graphdef, lora_state, base_state = nnx.split(abstract, nnx.LoRAParam, nnx.Param)
    shardings = {}
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(tree_shardings(base_state, mesh)))
    available = reader.names()
    for path, variable in nnx.to_flat_state(base_state):
        names = tuple(str(p) for p in path)
        sharding = shardings[path].get_value() if mesh is not None else None
        target = variable.get_value()
        variable.set_value(
            _read_parameter(reader, available, names, target, config, origin, sharding)
        )
    lora_state = _init_lora(config, lora, seed, mesh) if lora is not None else lora_state
    return nnx.merge(graphdef, lora_state, base_state)


def _read_parameter(
    reader: TensorReader,
    available: set[str],
    path: tuple[str, ...],
    target: jax.ShapeDtypeStruct,
    config: ModelConfig,
    origin: str,
    sharding: NamedSharding | None,
) -> jax.Array:
    tensors = hf_tensors_for(path, config.num_layers)
    np_dtype = np.dtype(DTYPES[config.param_dtype])
    buffer = np.empty(target.shape, np_dtype)
    stacked = path[0] == "layers"
    expected = target.shape[1:] if stacked else target.shape
    for index, tensor in enumerate(tensors):
        if tensor.name not in available:
            raise UserError(f"checkpoint {origin} has no tensor {tensor.name!r}")
        value = reader.get(tensor.name)
        if tensor.transpose:
            value = value.T
        if value.shape != expected:
            raise UserError(
                f"checkpoint {origin}: tensor {tensor.name!r} has shape "
                f"{value.shape}, the config implies {expected}"
            )
        if stacked:
            buffer[index] = value
        else:
            buffer[...] = value
    if sharding is None:
        return jnp.asarray(buffer)
    return global_array(buffer, sharding)  # each device receives only its shard


def _init_lora(config: ModelConfig, lora: LoraConfig, seed: int, mesh: Mesh | None) -> nnx.State:
    # Jitting the full constructor and keeping only the adapters lets XLA drop the random base
    # weights, so no memory is spent on weights that the checkpoint replaces.
    def init():
        return nnx.state(Llama(config, lora=lora, rngs=nnx.Rngs(seed)), nnx.LoRAParam)

    if mesh is None:
        return jax.jit(init)()
    return jax.jit(init, out_shardings=tree_shardings(jax.eval_shape(init), mesh))()


def load_tokenizer(path_or_name: str | Path):
    """The Hugging Face tokenizer stored with a model (GGUF files included)."""
    from transformers import AutoTokenizer

    source = resolve_source(path_or_name)
    if source.gguf_file:
        return AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)
    try:
        return AutoTokenizer.from_pretrained(source.directory)
    except (OSError, ValueError) as err:
        raise UserError(f"no usable tokenizer in {source.directory}: {err}") from None
