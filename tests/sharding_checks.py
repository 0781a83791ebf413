"""Sharded training checks, run by tests/test_sharding.py in a fresh process whose JAX sees
several simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`).

    python tests/sharding_checks.py equivalence OUT.json
    python tests/sharding_checks.py save DIR       # 8 devices: saves under 2x4 and 1 device
    python tests/sharding_checks.py restore DIR OUT.json
    python tests/sharding_checks.py pallas_attention OUT.json   # batch split over every device

Each command writes what it measured as JSON; the test compares it against the tolerances.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lora_training import activate_lora

from lemo_jax.configs import LoraConfig, get_model_config
from lemo_jax.configs.run import MeshSection, TrainSection
from lemo_jax.io.checkpoint import RunCheckpoints
from lemo_jax.lemo.budgets import elimination_plan
from lemo_jax.lemo.config import LemoConfig
from lemo_jax.model import Llama, trainable_filter
from lemo_jax.model.attention import causal_attention
from lemo_jax.train.optimizer import learning_rate_schedule, make_optimizer
from lemo_jax.train.sharding import (
    global_array,
    make_mesh,
    step_shardings,
    tree_shardings,
)
from lemo_jax.train.step import init_state, make_gradient_fn, make_train_step

CONFIG = dataclasses.replace(get_model_config("tiny"), num_layers=4, compute_dtype="float32")
LORA = LoraConfig(rank=4)
SEQ_LEN = 64
BATCH = (2, 8, SEQ_LEN)  # [A, B, T]: 2 accumulated micro-batches of 8 sequences
# 4 blocks of 16 tokens, 2 kept in every layer (no bucketing, which would round up to all 4).
LEMO = LemoConfig(
    enabled=True, block_size=16, schedule="uniform:0.5", bucket_blocks=1, kernels="xla"
)
MESHES = {"2x4": MeshSection(data="2", fsdp="4"), "8x1": MeshSection(data="8", fsdp="1")}
# A collective in compiled HLO text: `%name = SHAPE all-gather(...` (or all-gather-start, ...).
COLLECTIVE = re.compile(
    r"=\s*(.+?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)


def collectives(hlo_text: str) -> list[list[str]]:
    """The distinct (kind, result shape) of every collective in a compiled program."""
    found = {
        (kind, re.sub(r"\{[^}]*\}", "", shape)) for shape, kind in COLLECTIVE.findall(hlo_text)
    }
    return sorted([kind, shape] for kind, shape in found)


def _train_section(method: str) -> TrainSection:
    return TrainSection(
        method=method, seq_len=SEQ_LEN, steps=10, warmup_steps=0, learning_rate=1e-3, remat="full"
    )


def _state(method: str):
    lora = LORA if method == "lora" else None
    model = Llama(CONFIG, lora=lora, rngs=nnx.Rngs(0))
    if lora is not None:
        activate_lora(model)
    optimizer = make_optimizer(_train_section(method))
    graphdef, state = init_state(model, trainable_filter(lora), optimizer, seed=0)
    return graphdef, state, optimizer


def _batch() -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(1), BATCH, 0, CONFIG.vocab_size))


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf, np.float32) for leaf in jax.tree.leaves(tree)]


def _relative(actual, expected) -> float:
    """The largest per-leaf ||actual - expected|| / ||expected|| over two trees."""
    worst = 0.0
    for a, e in zip(_leaves(actual), _leaves(expected), strict=True):
        scale = np.linalg.norm(e)
        worst = max(
            worst, float(np.linalg.norm(a - e) / scale) if scale else float(np.abs(a).max())
        )
    return worst


def _one_step(
    method: str, use_lemo: bool, mesh_section: MeshSection | None, kernels: str = "xla"
) -> dict:
    """Gradients and loss, on one device or on the given mesh (with the compiled gradient
    step's collectives); without LeMo also the metrics and state after one optimizer step
    (with LeMo the step adds nothing but compile time). `kernels`: LeMo's ops, "xla" or
    "pallas" (interpreted on a CPU)."""
    train = _train_section(method)
    graphdef, state, optimizer = _state(method)
    lemo = dataclasses.replace(LEMO, kernels=kernels)
    plan = elimination_plan(lemo, CONFIG.num_layers, SEQ_LEN) if use_lemo else None
    batch = _batch()
    shardings = None
    if mesh_section is None:
        gradients = make_gradient_fn(graphdef, train, use_dropout=False, plan=plan)
        state_in, batch_in = state, jnp.asarray(batch)
        gradient_step = jax.jit(gradients)
    else:
        mesh = make_mesh(mesh_section)
        gradients = make_gradient_fn(graphdef, train, use_dropout=False, plan=plan, mesh=mesh)
        shardings = step_shardings(state, mesh)
        state_in = jax.device_put(state, shardings.state)
        batch_in = global_array(batch, shardings.batch)
        gradient_step = jax.jit(gradients, in_shardings=(shardings.state, shardings.batch))
    compiled = gradient_step.lower(state_in, batch_in).compile()
    grads, total, count = compiled(state_in, batch_in)
    result = dict(grads=grads, loss=total / count, plan=plan is not None, state=state_in)
    result["collectives"] = collectives(compiled.as_text())
    if use_lemo:
        return result
    step = make_train_step(
        graphdef,
        optimizer,
        learning_rate_schedule(train),
        train,
        use_dropout=False,
        plan=plan,
        shardings=shardings,
    )
    result["state"], result["metrics"] = step(state_in, batch_in)
    return result


def equivalence(out: Path) -> None:
    results = {}
    # LeMo under full fine-tuning only: its sharded trainables are the harder case, and each
    # case costs three compilations on a 2-core CPU. LeMo with the Pallas kernels (interpreted)
    # runs them under shard_map (`on_each_device`), as on GPUs.
    cases = (("lora", False, "xla"), ("full", False, "xla"), ("full", True, "xla"))
    cases += (("full", True, "pallas"),)
    for method, use_lemo, kernels in cases:
        reference = _one_step(method, use_lemo, None, kernels)
        for mesh_name, section in MESHES.items():
            sharded = _one_step(method, use_lemo, section, kernels)
            result = dict(
                uses_lemo=sharded["plan"],
                loss=_relative(sharded["loss"], reference["loss"]),
                gradients=_relative(sharded["grads"], reference["grads"]),
                collectives=sharded["collectives"],
                **_placement(sharded["state"], method),
            )
            if "metrics" in sharded:
                metrics, expected = sharded["metrics"], reference["metrics"]
                result["step_loss"] = _relative(metrics["loss"], expected["loss"])
                result["grad_norm"] = _relative(metrics["grad_norm"], expected["grad_norm"])
                result["updated_state"] = _relative(
                    sharded["state"].trainable, reference["state"].trainable
                )
            name = method + ("" if not use_lemo else "+lemo" if kernels == "xla" else "+pallas")
            results[f"{name} {mesh_name}"] = result
    out.write_text(json.dumps(results, indent=1))


def _placement(state, method: str) -> dict:
    """How a large weight and its Adam moment are placed after a step."""
    where = state.trainable if method == "full" else state.frozen
    kernel = where["layers"]["mlp"]["gate_proj"]["kernel"].get_value()
    placement = dict(
        kernel_spec=str(kernel.sharding.spec),
        kernel_shard=list(kernel.addressable_shards[0].data.shape),
        kernel_shape=list(kernel.shape),
    )
    if method == "full":
        moment = state.opt_state[1][0].mu["layers"]["mlp"]["gate_proj"]["kernel"].get_value()
        placement["moment_spec"] = str(moment.sharding.spec)
    else:
        lora_a = state.trainable["layers"]["attention"]["q_proj"]["lora_a"].get_value()
        placement["lora_a_spec"] = str(lora_a.sharding.spec)
    return placement


def _saved(state) -> dict:
    return dict(
        step=state.step, trainable=state.trainable, opt_state=state.opt_state, rng=state.rng
    )


def _trained_state(mesh_section: MeshSection | None, devices=None):
    """The full fine-tuning state after one step, on one device or on a mesh."""
    train = _train_section("full")
    graphdef, state, optimizer = _state("full")
    if mesh_section is None:
        step = make_train_step(
            graphdef, optimizer, learning_rate_schedule(train), train, use_dropout=False
        )
        return step(state, jnp.asarray(_batch()))[0]
    mesh = make_mesh(mesh_section, devices)
    shardings = step_shardings(state, mesh)
    step = make_train_step(
        graphdef,
        optimizer,
        learning_rate_schedule(train),
        train,
        use_dropout=False,
        shardings=shardings,
    )
    state = jax.device_put(state, shardings.state)
    return step(state, global_array(_batch(), shardings.batch))[0]


def _restore(directory: Path, target) -> dict:
    checkpoints = RunCheckpoints(directory, asynchronous=False)
    tree, _ = checkpoints.restore(1, target)
    checkpoints.close()
    return tree


def _compare(restored: dict, expected: dict) -> dict:
    kernel = restored["trainable"]["layers"]["mlp"]["gate_proj"]["kernel"].get_value()
    return dict(
        error=_relative(restored, expected),
        kernel_spec=str(getattr(kernel.sharding, "spec", type(kernel.sharding).__name__)),
        kernel_devices=len(kernel.sharding.device_set),
    )


def save(directory: Path) -> None:
    """Under 8 devices: a checkpoint from a 2x4 mesh (for the 1-device restore) and one from
    one device, restored here on a 4-device mesh."""
    state = _trained_state(MESHES["2x4"])
    checkpoints = RunCheckpoints(directory / "eight", asynchronous=False)
    checkpoints.save(1, _saved(state), {"data_position": 8})
    checkpoints.close()
    np.savez(directory / "expected.npz", *_leaves(_saved(state)))

    single = _trained_state(None)
    checkpoints = RunCheckpoints(directory / "one", asynchronous=False)
    checkpoints.save(1, _saved(single), {"data_position": 8})
    checkpoints.close()
    four = make_mesh(MeshSection(data="1", fsdp="4"), jax.devices()[:4])
    _, fresh, _ = _state("full")
    target = jax.device_put(_saved(fresh), tree_shardings(_saved(fresh), four))
    result = _compare(_restore(directory / "one", target), _saved(single))
    (directory / "one_to_four.json").write_text(json.dumps(result))


def restore(directory: Path, out: Path) -> None:
    """Under 1 device: the 2x4 mesh's checkpoint into an unsharded state."""
    _, fresh, _ = _state("full")
    restored = _restore(directory / "eight", _saved(fresh))
    expected = np.load(directory / "expected.npz")
    expected_leaves = [expected[f"arr_{index}"] for index in range(len(expected.files))]
    treedef = jax.tree.structure(_saved(fresh))
    result = _compare(restored, jax.tree.unflatten(treedef, expected_leaves))
    result["devices"] = jax.device_count()
    out.write_text(json.dumps(result))


def pallas_attention(out: Path) -> None:
    """The Pallas flash attention, forward and backward, on a mesh that splits the batch over
    every device: its collectives (none expected: each device attends over its own sequences)
    and its outputs and input gradients against the same kernel on one device."""
    mesh = make_mesh(MeshSection(data=str(jax.device_count()), fsdp="1"))
    batch, seq_len, heads, kv_heads, head_dim = jax.device_count(), 64, 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = 0.5 * jax.random.normal(keys[0], (batch, seq_len, heads, head_dim))
    k, v = (0.5 * jax.random.normal(key, (batch, seq_len, kv_heads, head_dim)) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape)

    def attention_and_gradients(q, k, v, cotangent):
        output, pullback = jax.vjp(lambda *x: causal_attention(*x, backend="pallas"), q, k, v)
        return output, pullback(cotangent)

    def on_mesh(*arrays):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return attention_and_gradients(*arrays)

    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
    arrays = [jax.device_put(x, split) for x in (q, k, v, cotangent)]
    compiled = jax.jit(on_mesh).lower(*arrays).compile()
    sharded = compiled(*arrays)
    expected = jax.jit(attention_and_gradients)(q, k, v, cotangent)
    result = dict(
        devices=jax.device_count(),
        collectives=collectives(compiled.as_text()),
        output=_relative(sharded[0], expected[0]),
        gradients=_relative(sharded[1], expected[1]),
    )
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    commands = dict(
        equivalence=equivalence, save=save, restore=restore, pallas_attention=pallas_attention
    )
    commands[command](*map(Path, arguments))
