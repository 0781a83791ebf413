"""Offline training of the block-score predictors against the oracle (paper section 4.3).

The base model is frozen. For a batch, one dense forward pass (a scan over the layers) yields
each layer's normalised attention input x_l and the oracle key-block scores of that layer
(paper eq. 2, `pallas_kernels.block_scores`). Every layer's predictor is fitted to its oracle
scores with a SmoothL1 loss, summed over layers. The targets are the ranks of the oracle
scores among the example's blocks; predictions and ranks are both standardised per example
(zero mean, unit variance over the blocks) before the loss: only the order of the scores
matters for the top-k selection, the raw scales differ by layer and length, and a few blocks
(the sequence start) score far above the rest, which squeezes the others together after a
plain standardisation. Measured (BENCHMARKS.md): on `tiny` with the `chunks` networks 0.875
with standardised scores or ranks (no difference there), against 0.453 for raw predictions
fitted to targets divided by their maximum. Ranks were kept for the squeezing argument and an
exploratory SmolLM2 comparison that is not a reproducible result (BENCHMARKS.md says which).

The `heads` predictors have no weights to fit: each layer keeps the `heads` query heads whose
oracle scores alone (the oracle's formula over that one head) reach the highest recall on the
training windows (`select_heads`), a selection made once offline with the same data and
schedule as the networks' training.

Recall at a layer is the fraction of the oracle's top-k blocks (k = the layer's budget in the
run's LeMo plan, the first `keep_first_blocks` forced in both) that the predictor's top-k also
selects; it is reported for the layers that eliminate blocks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lemo_jax.configs.run import RunConfig
from lemo_jax.data.pipeline import ShuffledSampler, prepare_data
from lemo_jax.io.checkpoint import RunCheckpoints
from lemo_jax.lemo.budgets import LayerBudgets, executed_budgets
from lemo_jax.lemo.calibrate import LayerScan, dense_layer_scan
from lemo_jax.lemo.config import resolve_kernels
from lemo_jax.lemo.layer import top_blocks
from lemo_jax.lemo.predictor import BlockScorePredictor, PredictorParam, save_predictor
from lemo_jax.model.llama import Llama
from lemo_jax.model.rope import rotary_angles
from lemo_jax.train.setup import build_model, predictor_config_for
from pallas_kernels import block_scores


def oracle_batch(
    model: Llama, token_ids: jax.Array, *, block_size: int, kernels: str, mlp: bool = False
) -> LayerScan:
    """The frozen dense model's per-layer predictor inputs and oracle scores: the attention
    inputs [L, B, T, D] and block scores [L, B, M], and for MLP token scorers (`mlp`) the MLP
    inputs [L, B, T, D] and the oracle's token magnitudes [L, B, T]."""
    scan = dense_layer_scan(
        model, token_ids, block_size=block_size, kernels=kernels, keep_inputs=True, keep_mlp=mlp
    )
    return jax.lax.stop_gradient(scan)


def _standardise(scores: jax.Array) -> jax.Array:
    """Per example: zero mean, unit variance over the blocks (the top-k sees only the order)."""
    centred = scores - jnp.mean(scores, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + 1e-12)


def _ranks(scores: jax.Array) -> jax.Array:
    """Each block's rank among its example's blocks (0 = lowest score), as float32."""
    return jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1).astype(jnp.float32)


def predictor_loss(predictor: BlockScorePredictor, batch: LayerScan) -> jax.Array:
    """SmoothL1 between the standardised predictions and the standardised ranks of the oracle
    scores, mean over blocks (tokens for MLP scorers) and examples, summed over layers and, with
    MLP scorers, over both kinds."""

    def fit(predicted, target):
        predicted, target = _standardise(predicted), _standardise(_ranks(target))
        return jnp.mean(optax.huber_loss(predicted, target, delta=1.0))

    def layer_loss(total, layer):
        index, inputs, scores, mlp_inputs, mlp_scores = layer
        total = total + fit(predictor(index, inputs), scores)
        if mlp_inputs is not None:  # the MLP token scorer, fitted the same way
            total = total + fit(predictor.token_scores(index, mlp_inputs), mlp_scores)
        return total, None

    num_layers = batch.scores.shape[0]
    layers = (
        jnp.arange(num_layers),
        batch.inputs,
        batch.scores,
        batch.mlp_inputs,
        batch.mlp_scores,
    )
    total, _ = jax.lax.scan(layer_loss, jnp.zeros((), jnp.float32), layers)
    return total


def _rope_tables(model: Llama, batch: int, length: int):
    """cos, sin [B, T, H] of positions 0..T-1, as the dense model uses them."""
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return rotary_angles(model.config.rope, model.config.head_dim, positions)


def layer_recall(
    predictor: BlockScorePredictor,
    batch: LayerScan,
    budgets: LayerBudgets,
    keep_first: int,
    model: Llama | None = None,
    kernels: str = "xla",
) -> dict[int, float]:
    """{layer: recall} over the layers whose attention keeps fewer than all blocks. The `heads`
    predictors read the layers' own projections: they need `model` (and score with
    `kernels`)."""
    recalls = {}
    with_model = predictor.config.architecture == "heads"
    if with_model and model is None:
        raise ValueError("the 'heads' predictors need the model to score blocks")
    if with_model:
        cos, sin = _rope_tables(model, *batch.inputs.shape[1:3])
    for layer, kept in enumerate(budgets.attention_blocks):
        if kept is None or kept >= budgets.num_blocks:
            continue
        if with_model:
            attention = model.layer(layer).attention
            predicted = predictor(layer, batch.inputs[layer], attention, cos, sin, kernels)
        else:
            predicted = predictor(layer, batch.inputs[layer])
        chosen = top_blocks(predicted, kept, keep_first)  # [B, k]
        truth = top_blocks(batch.scores[layer], kept, keep_first)
        hits = jnp.sum(chosen[:, :, None] == truth[:, None, :], axis=(1, 2))
        recalls[layer] = float(jnp.mean(hits / kept))
    return recalls


def selection_budget(budgets: LayerBudgets) -> int:
    """The block budget head selection ranks at: the smallest of the eliminating layers' (one
    budget for every such layer under `paper_e2e`), or half the blocks when none eliminates."""
    pruned = [k for k in budgets.attention_blocks if k is not None and k < budgets.num_blocks]
    return min(pruned) if pruned else max(1, budgets.num_blocks // 2)


def single_head_recall(
    model: Llama, batch: LayerScan, *, kept: int, keep_first: int, block_size: int, kernels: str
) -> jax.Array:
    """[L, N]: per layer and query head, the recall (mean over the batch) at `kept` blocks of
    the oracle's formula over that head alone, against the oracle over all heads."""
    num_layers, batch_size, length, _ = batch.inputs.shape
    cos, sin = _rope_tables(model, batch_size, length)

    def per_layer(_, layer_data):
        index, x, truth = layer_data  # x [B, T, D], truth [B, M]
        query, key = model.layer(index).attention.rotated_query_key(x, cos, sin)
        num_heads, num_kv_heads = query.shape[2], key.shape[2]
        key = jnp.repeat(key, num_heads // num_kv_heads, axis=2)  # [B, T, N, H], GQA

        # One head per batch row: [B, T, N, H] -> [B * N, T, 1, H].
        def one_per_row(values):
            return values.transpose(0, 2, 1, 3).reshape(batch_size * num_heads, length, 1, -1)

        scores = block_scores(
            one_per_row(query), one_per_row(key), block_size=block_size, impl=kernels
        )  # [B * N, M]
        chosen = top_blocks(scores, kept, keep_first)
        truth = jnp.repeat(top_blocks(truth, kept, keep_first), num_heads, axis=0)
        hits = jnp.sum(chosen[:, :, None] == truth[:, None, :], axis=(1, 2)) / kept
        return None, jnp.mean(hits.reshape(batch_size, num_heads), axis=0)  # [N]

    layers = (jnp.arange(num_layers), batch.inputs, batch.scores)
    _, recall = jax.lax.scan(per_layer, None, layers)
    return recall


def select_heads(head_recall: jax.Array, num_chosen: int) -> jax.Array:
    """[L, N] mean single-head recall -> [L, h] int32: each layer's `num_chosen` best heads,
    in increasing order. The best single heads, not a greedy search over subsets: on SmolLM2
    at 2,048 tokens (chosen on 12 training windows, measured on 8 held-out ones) the two gave
    the same held-out recall within 0.003 for 1 to 4 heads, and the mean needs only [L, N]
    numbers however many training windows there are."""
    order = jnp.argsort(-head_recall, axis=-1)[:, :num_chosen]
    return jnp.sort(order, axis=-1).astype(jnp.int32)


def _top_mask(scores: jax.Array, kept: int) -> jax.Array:
    """[B, T] bool: each example's `kept` highest-scoring tokens."""
    _, ids = jax.lax.top_k(scores, kept)
    rows = jnp.arange(scores.shape[0])[:, None]
    return jnp.zeros(scores.shape, bool).at[rows, ids].set(True)


def mlp_token_recall(
    predictor: BlockScorePredictor, batch: LayerScan, budgets: LayerBudgets
) -> dict[int, float]:
    """{layer: recall} of the MLP token scorers over the layers whose MLP keeps fewer than all
    tokens: the share of the oracle's top-k tokens that the scorer's top-k also picks."""
    recalls = {}
    for layer, kept_blocks in enumerate(budgets.mlp_blocks):
        if kept_blocks is None or kept_blocks >= budgets.num_blocks:
            continue
        kept = kept_blocks * budgets.block_size
        predicted = predictor.token_scores(layer, batch.mlp_inputs[layer])
        both = _top_mask(predicted, kept) & _top_mask(batch.mlp_scores[layer], kept)
        hits = jnp.sum(both, axis=-1)
        recalls[layer] = float(jnp.mean(hits / kept))
    return recalls


def make_predictor_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
    """A jitted `step(params, opt_state, batch) -> (params, opt_state, loss)`."""

    def loss_of(params, batch):
        return predictor_loss(nnx.merge(graphdef, params), batch)

    @jax.jit
    def step(params, opt_state, batch: LayerScan):
        loss, grads = jax.value_and_grad(loss_of)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@dataclasses.dataclass
class PredictorRun:
    """What `train_predictors` did: steps, last loss, recall per eliminating layer and mean."""

    directory: Path
    step: int
    loss: float | None
    recall: dict[int, float]
    resumed_from: int | None = None
    mlp_recall: dict[int, float] = dataclasses.field(default_factory=dict)

    @property
    def mean_recall(self) -> float | None:
        return _mean(self.recall.values())

    @property
    def mean_mlp_recall(self) -> float | None:
        return _mean(self.mlp_recall.values())


def _with_heads(params, heads: jax.Array):
    """`params` (the `heads` predictors' state) with the stacked head indices set to `heads`."""
    params = jax.tree.map(lambda value: value, params)  # a copy; the caller's stays as it was
    params["layers"]["heads"].set_value(heads)
    return params


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def train_predictors(
    config: RunConfig,
    *,
    out: str | Path,
    steps: int = 400,
    learning_rate: float = 1e-3,
    eval_batches: int = 4,
    checkpoint_every: int = 100,
    show_progress: bool = True,
) -> PredictorRun:
    """Fits `config`'s model's predictors (module doc), saves them in `out` and the recall per
    layer in `out/recall.json`. Re-running with the same `out` resumes from its checkpoint."""
    from tqdm.auto import tqdm

    train, lemo = config.train, config.lemo
    directory = Path(out).expanduser()
    model, tokenizer = build_model(config.model, None, seq_len=train.seq_len, seed=train.seed)
    train_windows, validation_windows = prepare_data(
        config.data, tokenizer, train.seq_len, show_progress=show_progress
    )
    budgets = executed_budgets(lemo, model.config.num_layers, train.seq_len)
    predictor = BlockScorePredictor(predictor_config_for(model.config, lemo), nnx.Rngs(train.seed))
    graphdef, params = nnx.split(predictor, PredictorParam)  # its weights are its only state
    optimizer = optax.adamw(learning_rate)
    choose_heads = predictor.config.architecture == "heads"  # no weights: a head selection
    if choose_heads:  # the running sum of per-head recalls [L, N] stands in for the optimizer's
        opt_state = jnp.zeros((model.config.num_layers, model.config.num_heads), jnp.float32)
    else:
        opt_state = optimizer.init(params)
    checkpoints = RunCheckpoints(directory / "checkpoints", keep=2)
    start, position, resumed_from = 0, 0, None
    restored = checkpoints.restore_latest(dict(params=params, opt_state=opt_state))
    if restored is not None:
        start, tree, record = restored
        params, opt_state, position = tree["params"], tree["opt_state"], record["data_position"]
        resumed_from = start

    model_graph, model_state = nnx.split(model)
    del model
    kernels = resolve_kernels(lemo, "block_scores")
    with_mlp = predictor.config.mlp  # token-sparse MLPs: fit their token scorers too
    collect = jax.jit(
        lambda state, ids: oracle_batch(
            nnx.merge(model_graph, state),
            ids,
            block_size=lemo.block_size,
            kernels=kernels,
            mlp=with_mlp,
        )
    )
    step_fn = make_predictor_step(graphdef, optimizer)
    if choose_heads:
        if with_mlp:
            raise UserError("the 'heads' predictors have no MLP token scorers; use lemo.mlp=dense")
        head_recall_of = jax.jit(
            lambda state, batch: single_head_recall(
                nnx.merge(model_graph, state),
                batch,
                kept=selection_budget(budgets),
                keep_first=lemo.keep_first_blocks,
                block_size=lemo.block_size,
                kernels=kernels,
            )
        )
    sampler = ShuffledSampler(len(train_windows), train.seed)
    loss = None
    progress = tqdm(total=steps, initial=start, desc="predictors", disable=not show_progress)
    for step in range(start + 1, steps + 1):
        token_ids = jnp.asarray(train_windows.batch(sampler.indices(position, train.batch_size)))
        position += train.batch_size
        batch = collect(model_state, token_ids)
        if choose_heads:
            step_recall = head_recall_of(model_state, batch)  # [L, N]
            opt_state = opt_state + step_recall  # checkpointed: a resumed run keeps the sum
            params = _with_heads(params, select_heads(opt_state / step, predictor.config.heads))
        else:
            params, opt_state, loss_value = step_fn(params, opt_state, batch)
            loss = float(loss_value)
        if loss is not None:
            progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
        progress.update(1)
        if step % checkpoint_every == 0 or step == steps:
            checkpoints.save(
                step, dict(params=params, opt_state=opt_state), {"data_position": position}
            )
    progress.close()
    checkpoints.close()

    trained = nnx.merge(graphdef, params)
    per_batch, mlp_per_batch = [], []
    dense_model = nnx.merge(model_graph, model_state) if choose_heads else None
    for index in range(min(eval_batches, len(validation_windows))):
        batch = collect(model_state, jnp.asarray(validation_windows.batch([index])))
        per_batch.append(
            layer_recall(trained, batch, budgets, lemo.keep_first_blocks, dense_model, kernels)
        )
        if with_mlp:
            mlp_per_batch.append(mlp_token_recall(trained, batch, budgets))

    def average(batches):
        return {
            layer: _mean(r[layer] for r in batches) for layer in (batches[0] if batches else {})
        }

    recall, mlp_recall = average(per_batch), average(mlp_per_batch)
    save_predictor(trained, directory)
    result = PredictorRun(directory, max(start, steps), loss, recall, resumed_from, mlp_recall)
    (directory / "recall.json").write_text(
        json.dumps(
            dict(
                step=result.step,
                seq_len=train.seq_len,
                schedule=lemo.schedule,
                validation_windows=len(per_batch),
                mean_recall=result.mean_recall,
                per_layer={str(layer): value for layer, value in recall.items()},
                **(
                    dict(
                        mlp_mean_recall=result.mean_mlp_recall,
                        mlp_per_layer={str(layer): value for layer, value in mlp_recall.items()},
                    )
                    if with_mlp
                    else {}
                ),
            ),
            indent=1,
        )
    )
    return result
