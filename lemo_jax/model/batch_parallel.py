"""Batch-parallel layout under a device mesh: each device computes on its own sequences.

A training step on a mesh traces under that mesh's abstract mesh
(`lemo_jax.train.step.make_gradient_fn(mesh=...)`); batches are split on B over every mesh
axis (`lemo_jax.train.sharding`). Two things keep XLA's partitioner to that layout:

- `constrain_to_batch(h)` pins the residual stream [B, T, D] to it at every layer boundary.
  Left to propagation, FSDP-sharded weights (D split over `fsdp`) can pull activations onto
  the model dim too, and XLA then all-reduces [B, T, F] partial products of every layer
  instead of all-gathering the weights (FSDP's pattern, whose traffic does not grow with T).
- `on_each_device(function, *args)` runs per-sequence ops (LeMo's selection and row kernels)
  in `jax.shard_map`: the partitioner would gather the whole batch onto each device for
  `lax.top_k`, for a scatter indexed by (batch, token) pairs and for any Pallas kernel (opaque
  to it), then run the op whole everywhere.

Without a mesh of several devices both are the identity / a plain call.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec


def _batch_mesh(batch_size: int):
    """The abstract mesh traced under, if it has several devices and divides the batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or batch_size % mesh.size:
        return None
    return mesh


def constrain_to_batch(x: jax.Array) -> jax.Array:
    """x [B, ...] split on B over every mesh axis, the rest replicated (module doc)."""
    mesh = _batch_mesh(x.shape[0])
    if mesh is None:
        return x
    sharding = jax.sharding.NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    return jax.lax.with_sharding_constraint(x, sharding)


def on_each_device(function, *args: jax.Array, shared: tuple[jax.Array, ...] = ()):
    """`function(*args, *shared)` for per-sequence ops, run by each device on its own
    sequences.

    `args` and the result are split on their leading batch dim over every mesh axis and
    `function` runs in `jax.shard_map`: no collectives. `shared` arrays (a norm's scale, say)
    are the same for every sequence: they enter the map broadcast to [B, ...], so that the
    backward pass sums their gradients over the batch outside it, and `function` sees one
    copy.
    """
    mesh = _batch_mesh(args[0].shape[0])
    if mesh is None:
        return function(*args, *shared)
    batch = args[0].shape[0]
    broadcast = [jax.numpy.broadcast_to(x, (batch, *x.shape)) for x in shared]

    def local(*arrays):
        return function(*arrays[: len(args)], *(x[0] for x in arrays[len(args) :]))

    spec = PartitionSpec(mesh.axis_names)
    in_specs = (spec,) * (len(args) + len(broadcast))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(
        *args, *broadcast
    )


__all__ = ["constrain_to_batch", "on_each_device"]
