"""The functional core of training: `train_step(state, batch) -> (state, metrics)`.

The state holds the trainable parameters, the frozen ones (LoRA's base weights; donated and
returned unchanged, so XLA aliases them), the optimizer state, the step and an RNG key. A batch
is int32 [A, B, T]: A micro-batches are accumulated with a `lax.scan`, and the gradient is that
of the mean loss over every predicted token of the step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from lemo_jax.configs.run import TrainSection
from lemo_jax.lemo.layer import EliminationPlan
from lemo_jax.model.llama import Llama
from lemo_jax.model.loss import chunked_cross_entropy, next_token_targets


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    trainable: nnx.State
    frozen: nnx.State
    opt_state: Any
    rng: jax.Array  # uint32 key data (raw, so that it checkpoints as an array)


def sequence_loss_sum(
    model: Llama,
    token_ids: jax.Array,
    *,
    dropout_key: jax.Array | None,
    remat_policy: str,
    loss_chunk_size: int,
    plan: EliminationPlan | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLLs, number of predicted tokens) for int32 [B, T] sequences."""
    hidden = model.hidden_states(
        token_ids, dropout_key=dropout_key, remat_policy=remat_policy, plan=plan
    )
    targets, weights = next_token_targets(token_ids)
    if loss_chunk_size:
        return chunked_cross_entropy(
            model.logits, hidden, targets, weights, chunk_size=loss_chunk_size
        )
    logits = model.logits(hidden)  # [B, T, V] float32: the peak that chunking removes
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * weights), jnp.sum(weights)


@struct.dataclass
class StepShardings:
    """Where the step's inputs live on a mesh (`lemo_jax.train.sharding`): the state tree of
    NamedShardings, the [A, B, T] batch's and the (replicated) metrics'."""

    state: Any
    batch: jax.sharding.NamedSharding
    metrics: jax.sharding.NamedSharding


def make_gradient_fn(
    graphdef: nnx.GraphDef,
    train: TrainSection,
    *,
    use_dropout: bool,
    plan: EliminationPlan | None = None,
    mesh: jax.sharding.Mesh | None = None,
):
    """`gradients(state, batch [A, B, T]) -> (grads, loss sum, token count)`, unjitted: the
    gradient of the mean token loss over the A accumulated micro-batches. With `mesh` (the
    batch's), it traces under that abstract mesh, where LeMo's per-sequence ops run on each
    device's own sequences (`lemo_jax.lemo.layer.on_each_device`)."""

    def loss_sum(trainable, frozen, token_ids, key):
        model = nnx.merge(graphdef, trainable, frozen)
        return sequence_loss_sum(
            model,
            token_ids,
            dropout_key=key if use_dropout else None,
            remat_policy=train.remat,
            loss_chunk_size=train.loss_chunk_size,
            plan=plan,
        )

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def gradients(state: TrainState, batch: jax.Array):
        if mesh is None:
            return accumulated(state, batch)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return accumulated(state, batch)

    def accumulated(state: TrainState, batch: jax.Array):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        keys = jax.random.split(step_key, batch.shape[0])

        def accumulate(carry, micro):
            grads, total, count = carry
            (micro_total, micro_count), micro_grads = grad_fn(state.trainable, state.frozen, *micro)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (grads, total + micro_total, count + micro_count), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, total, count), _ = jax.lax.scan(accumulate, init, (batch, keys))
        return jax.tree.map(lambda g: g / count, grads), total, count

    return gradients


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    train: TrainSection,
    *,
    use_dropout: bool,
    plan: EliminationPlan | None = None,
    shardings: StepShardings | None = None,
):
    """A jitted `train_step(state, batch)` with the state donated; `plan` (static) selects LeMo
    token elimination per layer group. With `shardings`, the step is compiled for that mesh
    (state in and out with the same shardings, so donation reuses the buffers); without, it
    runs where its inputs are (one device)."""
    mesh = None if shardings is None else shardings.batch.mesh
    gradients = make_gradient_fn(graphdef, train, use_dropout=use_dropout, plan=plan, mesh=mesh)

    def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict]:
        grads, total, count = gradients(state, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = dict(
            loss=total / count,
            grad_norm=optax.tree.norm(grads),
            learning_rate=schedule(state.step),
            tokens=count,  # over the global batch: every process's tokens
        )
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new_state, metrics

    if shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(
        train_step,
        in_shardings=(shardings.state, shardings.batch),
        out_shardings=(shardings.state, shardings.metrics),
        donate_argnums=0,
    )


def make_eval_step(graphdef: nnx.GraphDef, train: TrainSection):
    """A jitted `eval_step(state, token_ids [B, T]) -> (NLL sum, token count)`, no dropout."""

    @jax.jit
    def eval_step(state: TrainState, token_ids: jax.Array):
        model = nnx.merge(graphdef, state.trainable, state.frozen)
        return sequence_loss_sum(
            model,
            token_ids,
            dropout_key=None,
            remat_policy="none",
            loss_chunk_size=train.loss_chunk_size or token_ids.shape[1],
        )

    return eval_step


def init_state(
    model: Llama, trainable_filter, optimizer: optax.GradientTransformation, seed: int
) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=optimizer.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return graphdef, state
