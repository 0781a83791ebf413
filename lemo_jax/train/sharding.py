"""Spreading a run over devices: a `data` x `fsdp` mesh and shardings from logical axis names.

Every parameter carries logical axis names (`lemo_jax.model.layers`); `LOGICAL_RULES` maps
them to mesh axes. Only the model dim `embed` is sharded, over `fsdp` (ZeRO-3 / FSDP: each
device holds 1/fsdp of every weight and of its optimizer state, and XLA all-gathers a layer's
weights when the scan reaches it). It is the one axis every weight matrix, embedding and norm
has, so one rule shards them all; `layers` is never sharded (the scan indexes it). LoRA
adapters are replicated whatever the rules say: they are small, and replicating them keeps the
trainable state and its gradient all-reduce tiny. The frozen base follows the rules, so
`mesh.fsdp=1` replicates it and `mesh.fsdp>1` shards it.

Batches [A, B, T] are split on B over both mesh axes together (`BATCH_AXES`): every device
computes on its own sequences, so FSDP is also data parallelism. Whole sequences stay on one
device, so LeMo's token elimination (a per-sequence top-k over blocks) needs no communication;
it does need `train.batch_size` to be a multiple of the device count. A dimension that the
mesh axis does not divide is replicated instead of sharded.

Axes are `Auto` (XLA's sharding propagation places the activations), not `Explicit`: the
model's einsums would otherwise need explicit reshards (`../shared/docs/platform.md`).

Under a mesh the model is created sharded: `build_sharded` runs the constructor in `jax.jit`
with the rules' shardings as outputs, so each device computes and keeps only its shards and
no device ever holds the whole model (which would bound the model size by one device). JAX's
partitionable Threefry RNG makes the values independent of the mesh. `sharded_train_state`
then adds the optimizer state, created in `jax.jit` on its parameters' shardings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lemo_jax.configs.run import MeshSection
from lemo_jax.errors import UserError
from lemo_jax.train.step import StepShardings, TrainState, init_state

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# Logical axis name -> mesh axis (None: replicated). Names missing here are replicated too.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("vocab", None),
    ("q_heads", None),
    ("kv_heads", None),
    ("mlp", None),
    ("lora_rank", None),
    ("layers", None),
)


def make_mesh(section: MeshSection, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp) mesh over `devices` (all devices, of every process, by default)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = section.shape(len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """[A, B, T] (ndim 3) or [B, T] (ndim 2) token ids, split on B over every device."""
    spec = (None,) * (ndim - 2) + (BATCH_AXES, None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def variable_spec(
    variable: nnx.Variable, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES
) -> PartitionSpec:
    """The partition of one parameter (or an optimizer moment mirroring it)."""
    shape = np.shape(variable.get_value())
    names = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
    if isinstance(variable, nnx.LoRAParam):
        return PartitionSpec()
    table = dict(rules)
    axes = []
    for size, name in zip(shape, names, strict=True):
        axis = table.get(name)
        # An axis the mesh does not divide stays whole (e.g. a 9-head dim over 4 devices).
        is_divisible = axis is not None and size % mesh.shape[axis] == 0
        axes.append(axis if is_divisible and mesh.shape[axis] > 1 else None)
    return PartitionSpec(*axes)


def tree_shardings(
    tree, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES
):  # same structure as `tree`, NamedSharding leaves
    """Shardings for a tree holding NNX variables: the training state, or its optimizer state
    (Optax's moments are NNX states of the same variables, so they follow their parameters).
    Everything else (step, RNG key, Adam's count) is replicated."""

    def sharding(leaf):
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(NamedSharding(mesh, variable_spec(leaf, mesh, rules)))
        return replicated(mesh)

    return jax.tree.map(sharding, tree, is_leaf=lambda leaf: isinstance(leaf, nnx.Variable))


def global_array(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from `host_array`, which every process holds whole (the same batch is
    read by every host; each materialises only its own devices' shards)."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def place(tree, shardings):
    """`tree` moved onto `shardings`. Arrays already there stay as they are; every other leaf
    must be held whole and identical by every process (built from the same seed or file)."""

    def put(leaf, sharding):
        if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
            return leaf
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        return global_array(np.asarray(leaf), sharding)

    return jax.tree.map(put, tree, shardings)


def sharded_init(
    constructor: Callable[[], nnx.Module], mesh: Mesh
) -> tuple[nnx.GraphDef, Callable[[], nnx.State]]:
    """`(graphdef, create)`: the jitted `create()` runs `constructor` and returns the module's
    variables on their shardings under `mesh` (`tree_shardings`). XLA partitions the random
    initialisation along with its outputs, so a device computes only its own shards; the
    compiled `create` (`create.lower().compile()`) reports that memory per device."""
    graphdef, abstract = nnx.split(nnx.eval_shape(constructor))
    create = jax.jit(lambda: nnx.state(constructor()), out_shardings=tree_shardings(abstract, mesh))
    return graphdef, create


def build_sharded(constructor: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """`constructor()`, with every variable created directly on its sharding under `mesh`."""
    graphdef, create = sharded_init(constructor, mesh)
    return nnx.merge(graphdef, create())


def sharded_train_state(
    model: nnx.Module,
    trainable_filter: nnx.filterlib.Filter,
    optimizer: optax.GradientTransformation,
    seed: int,
    mesh: Mesh,
) -> tuple[nnx.GraphDef, TrainState]:
    """`init_state` on `mesh`, consuming `model` (its arrays are donated to the state).

    Parameters built sharded (`build_sharded`, `load_pretrained(mesh=...)`) stay where they
    are; anything else on the model (e.g. predictors attached afterwards) is placed first. The
    optimizer state is created in `jax.jit` directly on its parameters' shardings, never
    replicated first, and donation moves the parameters into the state without a copy.
    """
    graphdef, _, _ = nnx.split(model, trainable_filter, ...)
    model_graphdef, variables = nnx.split(model)
    variables = place(variables, tree_shardings(variables, mesh))

    def init(variables: nnx.State) -> TrainState:
        model = nnx.merge(model_graphdef, variables)
        return init_state(model, trainable_filter, optimizer, seed)[1]

    shardings = tree_shardings(jax.eval_shape(init, variables), mesh)
    state = jax.jit(init, out_shardings=shardings, donate_argnums=0)(variables)
    return graphdef, state


def run_mesh(section: MeshSection, batch_size: int) -> Mesh:
    """The run's mesh over every device; a `UserError` if it does not fit them or the batch."""
    try:
        mesh = make_mesh(section)
    except ValueError as err:
        raise UserError(str(err)) from None
    if batch_size % mesh.size:
        raise UserError(
            f"train.batch_size={batch_size} must be a multiple of the {mesh.size} devices of "
            f"the mesh (each device trains on whole sequences)"
        )
    return mesh


def step_shardings(state, mesh: Mesh) -> StepShardings:
    """Where a training step's state, [A, B, T] batch and metrics live on `mesh`."""
    return StepShardings(
        state=tree_shardings(state, mesh), batch=batch_sharding(mesh), metrics=replicated(mesh)
    )
