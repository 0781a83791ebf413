"""Sharded model construction checks, run by tests/test_sharding.py in a fresh process whose JAX
sees 8 simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`).

    python tests/sharded_build_checks.py DIR OUT.json

Under a 2x4 and a 1x8 mesh: a model with random weights (`build_model`), its training state
(`sharded_train_state`), and a small Hugging Face checkpoint written to DIR and loaded
(`load_pretrained`); each compared with the same model built on one device. Writes what it
measured as JSON; the test asserts on it.
"""

from __future__ import annotations

import collections
import gc
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from hf_models import save_tiny_llama, tiny_llama_config
from jax.sharding import Mesh, NamedSharding

from lemo_jax.configs import LoraConfig
from lemo_jax.configs.run import MeshSection, ModelSection, TrainSection
from lemo_jax.io.load import build_from_tensors, load_pretrained
from lemo_jax.io.sources import load_hf_config, open_tensors, resolve_source
from lemo_jax.model import Llama, trainable_filter
from lemo_jax.train.optimizer import make_optimizer
from lemo_jax.train.setup import build_model, model_config_for
from lemo_jax.train.sharding import (
    batch_sharding,
    global_array,
    make_mesh,
    sharded_init,
    sharded_train_state,
    variable_spec,
)
from lemo_jax.train.step import sequence_loss_sum

SECTION = ModelSection(init="random", preset="tiny", compute_dtype="float32")
LORA = LoraConfig(rank=4)
SEQ_LEN = 64
MESHES = {"2x4": MeshSection(data="2", fsdp="4"), "1x8": MeshSection(data="1", fsdp="8")}


def _model(mesh: Mesh | None, lora: LoraConfig | None = None) -> Llama:
    return build_model(SECTION, lora, seq_len=SEQ_LEN, seed=0, mesh=mesh)[0]


def _bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def _device_bytes(arrays) -> dict[str, int]:
    """The bytes of `arrays` that each device holds. Counted by buffer: a shard read through
    `addressable_shards` is itself a live array sharing its parent's buffer."""
    buffers = {}
    for array in arrays:
        for shard in array.addressable_shards:
            buffers[shard.device, shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
    held = collections.Counter()
    for (device, _), size in buffers.items():
        held[str(device)] += size
    return held


def _placement(tree, mesh: Mesh) -> dict:
    """The variables of `tree` whose sharding is not the rules', and those of the sharded ones
    whose per-device shards do not hold 1/fsdp of the elements."""
    fsdp = mesh.shape["fsdp"]
    wrong, uneven, sharded = [], [], 0
    for path, variable in nnx.to_flat_state(tree):
        name, value = "/".join(map(str, path)), variable.get_value()
        expected = NamedSharding(mesh, variable_spec(variable, mesh))
        if value.sharding != expected:
            wrong.append(f"{name}: {value.sharding} != {expected}")
        if "fsdp" in expected.spec:
            sharded += 1
            if any(shard.data.size * fsdp != value.size for shard in value.addressable_shards):
                uneven.append(name)
    return dict(wrong_sharding=wrong, uneven_shards=uneven, sharded=sharded)


def _difference(actual, expected) -> tuple[float, float]:
    """(largest absolute difference, largest per-leaf relative difference) of two trees."""
    largest, relative = 0.0, 0.0
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        largest = max(largest, float(np.abs(a - e).max()))
        scale = np.linalg.norm(e)
        if scale:
            relative = max(relative, float(np.linalg.norm(a - e) / scale))
    return largest, relative


def _loss(model: Llama, batch: np.ndarray, mesh: Mesh | None) -> float:
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(state, token_ids):
        total, count = sequence_loss_sum(
            nnx.merge(graphdef, state),
            token_ids,
            dropout_key=None,
            remat_policy="none",
            loss_chunk_size=0,
        )
        return total / count

    token_ids = batch if mesh is None else global_array(batch, batch_sharding(mesh, ndim=2))
    return float(loss(state, token_ids))


def random_build(mesh: Mesh, reference: Llama, one_device_mesh: Llama) -> dict:
    """A full model with random weights built under `mesh`: placement, bytes per device (held,
    and at the peak of its compiled initialisation), values, loss; then its training state."""
    model = _model(mesh)
    state = nnx.state(model)
    config = model_config_for(SECTION, seq_len=SEQ_LEN)
    _, create = sharded_init(lambda: Llama(config, rngs=nnx.Rngs(0)), mesh)
    memory = create.lower().compile().memory_analysis()
    batch = np.asarray(jax.random.randint(jax.random.key(1), (8, SEQ_LEN), 0, config.vocab_size))
    reference_loss = _loss(reference, batch, None)
    result = dict(
        placement=_placement(state, mesh),
        total_bytes=_bytes(state),
        device_bytes=_device_bytes(jax.tree.leaves(state)),
        init_peak_bytes=memory.temp_size_in_bytes + memory.output_size_in_bytes,
        mesh_difference=_difference(state, nnx.state(one_device_mesh))[0],
        eager_difference=_difference(state, nnx.state(reference))[1],
        loss_difference=abs(_loss(model, batch, mesh) - reference_loss) / reference_loss,
    )
    optimizer = make_optimizer(TrainSection(method="full", seq_len=SEQ_LEN))
    _, train_state = sharded_train_state(model, trainable_filter(None), optimizer, 0, mesh)
    moments = [train_state.opt_state[1][0].mu, train_state.opt_state[1][0].nu]
    result["moment_placement"] = [_placement(moment, mesh) for moment in moments]
    result["state_bytes"] = _bytes(train_state)
    result["state_device_bytes"] = _device_bytes(jax.tree.leaves(train_state))
    return result


class _RecordingReader:
    """A tensor reader that samples, at every read, the bytes each device holds beyond what it
    held when the reader was made: the device memory of the parameters loaded so far."""

    def __init__(self, reader):
        self.reader, self.peak = reader, collections.Counter()
        self.baseline = _device_bytes(jax.live_arrays())

    def names(self) -> set[str]:
        return self.reader.names()

    def get(self, name: str) -> np.ndarray:
        self.sample()
        return self.reader.get(name)

    def sample(self) -> None:
        for device, size in _device_bytes(jax.live_arrays()).items():
            self.peak[device] = max(self.peak[device], size - self.baseline.get(device, 0))


def hf_load(directory: Path, mesh: Mesh, reference: Llama) -> dict:
    """The checkpoint loaded under `mesh` with LoRA adapters: placement and values against the
    one-device load; and, loaded without adapters, the bytes per device while loading."""
    model = load_pretrained(
        directory, dtype="float32", compute_dtype="float32", lora=LORA, mesh=mesh
    )
    result = dict(
        placement=_placement(nnx.state(model), mesh),
        lora_specs=sorted(
            {
                str(v.get_value().sharding.spec)
                for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
            }
        ),
        difference=_difference(nnx.state(model), nnx.state(reference))[0],
    )
    del model
    gc.collect()
    source = resolve_source(directory)
    hf_config = load_hf_config(source)
    config = model_config_for(ModelSection(path=str(directory), compute_dtype="float32"), seq_len=0)
    reader = _RecordingReader(open_tensors(source, hf_config))
    loaded = build_from_tensors(config, reader, lora=None, seed=0, origin="test", mesh=mesh)
    reader.sample()  # after the last parameter
    result["load_peak_device_bytes"] = dict(reader.peak)
    result["load_total_bytes"] = _bytes(nnx.state(loaded))
    return result


def main(directory: Path, out: Path) -> None:
    save_tiny_llama(directory, tiny_llama_config())
    reference = _model(None)  # one device, eager
    one_device_mesh = _model(make_mesh(MeshSection(data="1", fsdp="1"), jax.devices()[:1]))
    lora_reference = _model(None, LORA)
    hf_reference = load_pretrained(directory, dtype="float32", compute_dtype="float32", lora=LORA)
    results = {}
    for name, section in MESHES.items():
        mesh = make_mesh(section)
        lora_model = _model(mesh, LORA)
        results[name] = dict(
            fsdp=mesh.shape["fsdp"],
            random=random_build(mesh, reference, one_device_mesh),
            lora_placement=_placement(nnx.state(lora_model), mesh),
            lora_difference=_difference(nnx.state(lora_model), nnx.state(lora_reference))[1],
            hf=hf_load(directory, mesh, hf_reference),
        )
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:]))
