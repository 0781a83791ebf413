"""Context-aware pattern prediction (paper section 4.3): per-layer block-score predictors.

Per decoder layer, a Q and a K network read the layer's normalised input x [T, D] and give each
64-token block a `rank`-dimensional embedding; the predicted key-block scores are

    P[m, n]  = q_hat[m] . k_hat[n]                            (query block m, key block n)
    score[n] = sum over query blocks m >= n of P[m, n]        (causal, column sum, as eq. 2)

Three architectures (`PredictorConfig.architecture`); the first two are trained networks:

- `chunks`, the paper artifact's: x is cut into D / chunk_dim chunks of `chunk_dim` features,
  each block's rows of a chunk are concatenated into one vector of block_size * chunk_dim
  values, and three low-rank matrices with ReLU between ([F, r], [r, F], [F, r]) map it to
  q_hat[m, c] / k_hat[n, c], shared across chunks; P sums over the chunks.
- `pooled` (the default): two matrices with ReLU between ([D, r], [r, r]) map every token's x
  to r features, pooled over each block: the mean for queries (the oracle sums over queries),
  the max for keys (the oracle keeps a block for its strongest key). The same weights serve
  every token of a block, where `chunks` learns a separate weight per token slot: a third of
  the FLOPs and far fewer weights (90K against 1.6M per network on SmolLM2-135M). Measured
  (BENCHMARKS.md): on `tiny` with the same loss, recall 0.906 against 0.875 for `chunks`.

- `heads`: no network. The oracle's own formula (pallas_kernels.block_scores) restricted to
  `heads` query heads per layer, chosen offline (`predictor_training.select_heads`): exact
  per-token queries and keys from the layer's own W_q / W_k columns of those heads (with its
  LoRA update while fine-tuning), the run's RoPE, tile max of the head sum, causal column sum.
  Only the head indices are stored; the weights are read from the model at use time, so the
  caller passes the layer's attention module and its cos / sin. Why: the trained networks
  generalise poorly from the few windows of a corpus (recall on training windows far above
  held-out ones), and pooling over a block loses the tile max that decides the oracle's
  choice: on SmolLM2-135M at 2,048 tokens (8 held-out windows) the layer's frozen W_q / W_k
  applied to block means score 0.59 to 0.64, below position alone (0.80), and even exact keys
  with queries pooled over 16 tokens only 0.71; a few exact heads keep both the max and the
  content (0.91 with two heads chosen on 12 training windows). The cost is h / N of the
  oracle's q.k products and h / N of its q and k projections for multi-head attention.

and the layer keeps the top-k blocks by `score`, as it would by the oracle's. With `mlp`, each
layer also has a `TokenScorer` ranking tokens for a token-sparse MLP from the MLP's normalised
input, in place of the oracle's ||silu(gate(x)) * up(x)||, which costs two of the MLP's three
full-length projections. The predictors
are trained offline against the oracle scores with the base model frozen; in the model their
output is under stop-gradient. All L layers' networks are stacked on a leading [L] axis, so a
layer group's scan reads its layers' predictors by index, like the layers' own parameters.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from lemo_jax.errors import UserError
from lemo_jax.lemo.config import PREDICTOR_ARCHITECTURES
from lemo_jax.lemo.layer import oracle_block_scores
from lemo_jax.model.layers import stacked_at
from lemo_jax.model.rope import apply_rotary


class PredictorParam(nnx.Variable):
    """A predictor weight: not an `nnx.Param`, so a model carrying predictors never trains,
    exports or counts them as its own parameters (they are frozen while fine-tuning)."""


CONFIG_FILE = "predictor_config.json"
WEIGHTS_FILE = "predictor.safetensors"


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """Shapes of a model's predictors; saved next to their weights and checked on load."""

    num_layers: int
    model_dim: int
    chunk_dim: int  # the model's head dim in the paper's artifact
    block_size: int = 64
    rank: int = 128
    architecture: str = "pooled"  # "pooled", "chunks" or "heads" (module doc)
    mlp: bool = False  # also a per-token scorer for token-sparse MLPs (module doc)
    heads: int = 2  # query heads per layer of the `heads` architecture

    def __post_init__(self):
        if self.architecture not in PREDICTOR_ARCHITECTURES:
            raise ValueError(f"unknown predictor architecture {self.architecture!r}")
        if self.model_dim % self.chunk_dim:
            raise ValueError(f"chunk_dim={self.chunk_dim} must divide model_dim={self.model_dim}")
        for name in ("num_layers", "chunk_dim", "block_size", "rank", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"predictor {name} must be positive, got {getattr(self, name)}")

    @property
    def block_features(self) -> int:
        return self.block_size * self.chunk_dim


def _weight(rngs: nnx.Rngs, *shape: int) -> PredictorParam:
    """Normal weights scaled by 1 / sqrt(fan in), the first dimension."""
    return PredictorParam(jax.random.normal(rngs.params(), shape) / np.sqrt(shape[0]))


class LowRankPath(nnx.Module):
    """relu(relu(x W1) W2) W3 with W1 [F, r], W2 [r, F], W3 [F, r] (F = block features)."""

    def __init__(self, features: int, rank: int, rngs: nnx.Rngs):
        self.w1 = _weight(rngs, features, rank)
        self.w2 = _weight(rngs, rank, features)
        self.w3 = _weight(rngs, features, rank)

    def __call__(self, x: Float[Array, "... F"]) -> Float[Array, "... r"]:
        dtype = x.dtype
        hidden = jax.nn.relu(x @ self.w1[...].astype(dtype))
        hidden = jax.nn.relu(hidden @ self.w2[...].astype(dtype))
        return hidden @ self.w3[...].astype(dtype)


class TokenPath(nnx.Module):
    """relu(x W1) W2 per token, W1 [D, r], W2 [r, r]."""

    def __init__(self, features: int, rank: int, rngs: nnx.Rngs):
        self.w1 = _weight(rngs, features, rank)
        self.w2 = _weight(rngs, rank, rank)

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... r"]:
        dtype = x.dtype
        return jax.nn.relu(x @ self.w1[...].astype(dtype)) @ self.w2[...].astype(dtype)


class TokenScorer(nnx.Module):
    """relu(x W1) W2 w3 per token ([D, r], [r, r], [r]): a token's predicted MLP activation
    norm, ||silu(gate(x)) * up(x)||^2 up to a monotone map (the token-sparse MLP's criterion)."""

    def __init__(self, features: int, rank: int, rngs: nnx.Rngs):
        self.path = TokenPath(features, rank, rngs)
        self.w3 = _weight(rngs, rank)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T"]:
        hidden = self.path(x)
        return jnp.einsum("btr,r->bt", hidden, self.w3[...].astype(x.dtype)).astype(jnp.float32)


def head_columns(linear, x: Float[Array, "B T D"], heads, head_dim: int) -> Float[Array, "B T h H"]:
    """The output of `linear` (a `Linear`, [D, heads * H] plus LoRA) for the given heads only:
    x W[:, those heads' columns] (+ bias, + its LoRA update without dropout), so the cost is
    h / heads of the full projection. `heads` int32 [h]."""
    dtype = linear.compute_dtype
    x = x.astype(dtype)

    def columns(matrix):  # [..., heads * H] -> [..., h, H] for the chosen heads
        matrix = matrix.reshape(*matrix.shape[:-1], -1, head_dim)
        return jnp.take(matrix, heads, axis=-2).astype(dtype)

    y = jnp.einsum("btd,dhe->bthe", x, columns(linear.kernel[...]))
    if linear.bias is not None:
        y = y + columns(linear.bias[...])
    if linear.lora_a is not None:
        down = jnp.dot(x, linear.lora_a[...].astype(dtype))  # [B, T, r]
        y = y + linear.lora_scale * jnp.einsum("btr,rhe->bthe", down, columns(linear.lora_b[...]))
    return y


def head_block_scores(
    attention,
    x: Float[Array, "B T D"],
    cos: Float[Array, "B T H"],
    sin: Float[Array, "B T H"],
    heads,
    block_size: int,
    kernels: str = "xla",
) -> Float[Array, "B M"]:
    """The oracle's key-block scores (causal, column sum) over query heads `heads` [h] only, from
    the layer's own q / k projections of those heads and of their kv heads (GQA: n // G), with
    the oracle's kernels (`kernels`: "xla" or "pallas", as `lemo.kernels` resolves)."""
    num_heads, num_kv_heads, head_dim = attention.shape
    heads = jnp.asarray(heads, jnp.int32)
    kv_heads = heads // (num_heads // num_kv_heads)
    query = apply_rotary(head_columns(attention.q_proj, x, heads, head_dim), cos, sin)
    key = apply_rotary(head_columns(attention.k_proj, x, kv_heads, head_dim), cos, sin)
    return oracle_block_scores(query, key, block_size=block_size, kernels=kernels)  # [B, M]


class LayerPredictor(nnx.Module):
    """One layer's Q and K networks (or its chosen heads), and with `config.mlp` its MLP token
    scorer."""

    def __init__(self, config: PredictorConfig, rngs: nnx.Rngs):
        if config.mlp:
            self.mlp_tokens = TokenScorer(config.model_dim, config.rank, rngs)
        if config.architecture == "heads":  # chosen offline; the first heads until then
            self.heads = PredictorParam(jnp.arange(config.heads, dtype=jnp.int32))
        elif config.architecture == "pooled":
            self.query = TokenPath(config.model_dim, config.rank, rngs)
            self.key = TokenPath(config.model_dim, config.rank, rngs)
        else:
            self.query = LowRankPath(config.block_features, config.rank, rngs)
            self.key = LowRankPath(config.block_features, config.rank, rngs)
        self.config = config

    def __call__(
        self, x: Float[Array, "B T D"], attention=None, cos=None, sin=None, kernels: str = "xla"
    ) -> Float[Array, "B M"]:
        """Predicted key-block scores [B, M] from the layer's normalised input (T a multiple
        of the block size); the `heads` architecture also needs the layer's attention module,
        the cos / sin tables of the tokens' positions and the block-score kernels to use."""
        if self.config.architecture == "heads":
            _check_input(x, self.config)
            if attention is None or cos is None or sin is None:
                raise ValueError(
                    "the 'heads' predictors read the layer's own q / k weights: call them with "
                    "the layer's attention module and cos / sin"
                )
            heads = self.heads[...]
            return head_block_scores(attention, x, cos, sin, heads, self.config.block_size, kernels)
        if self.config.architecture == "pooled":
            batch, length, _ = x.shape
            _check_input(x, self.config)
            shape = (batch, length // self.config.block_size, self.config.block_size, -1)
            q_hat = self.query(x).reshape(shape).mean(axis=2)  # [B, M, r]
            k_hat = self.key(x).reshape(shape).max(axis=2)
            pair = jnp.einsum("bmr,bnr->bmn", q_hat, k_hat, preferred_element_type=jnp.float32)
        else:
            blocks = block_chunks(x, self.config)  # [B, M, C, b * chunk]
            q_hat, k_hat = self.query(blocks), self.key(blocks)  # [B, M, C, r]
            pair = jnp.einsum("bmcr,bncr->bmn", q_hat, k_hat, preferred_element_type=jnp.float32)
        num_blocks = pair.shape[1]
        causal = jnp.tril(jnp.ones((num_blocks, num_blocks), bool))  # key n <= query m
        return jnp.sum(jnp.where(causal, pair, 0.0), axis=1)


def _check_input(x: jax.Array, config: PredictorConfig) -> None:
    if x.shape[1] % config.block_size or x.shape[2] != config.model_dim:
        raise ValueError(
            f"predictor input {x.shape} needs T a multiple of {config.block_size} and "
            f"D = {config.model_dim}"
        )


def block_chunks(x: Float[Array, "B T D"], config: PredictorConfig) -> Float[Array, "B M C F"]:
    """[B, T, D] -> [B, M, C, block_size * chunk_dim]: each block's rows of each chunk, joined."""
    _check_input(x, config)
    batch, length, dim = x.shape
    num_chunks = dim // config.chunk_dim
    blocks = x.reshape(batch, length // config.block_size, config.block_size, num_chunks, -1)
    return blocks.transpose(0, 1, 3, 2, 4).reshape(
        batch, length // config.block_size, num_chunks, config.block_features
    )


class BlockScorePredictor(nnx.Module):
    """All layers' predictors, stacked on a leading [L] axis (`layer(index)` merges one)."""

    def __init__(self, config: PredictorConfig, rngs: nnx.Rngs):
        self.config = config

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(layer_rngs: nnx.Rngs) -> LayerPredictor:
            return LayerPredictor(config, layer_rngs)

        self.layers = make(rngs)

    def layer(self, index) -> LayerPredictor:
        """Layer `index`'s predictor (index may be traced, as inside a scan)."""
        return stacked_at(self.layers, index)

    def __call__(
        self,
        index,
        x: Float[Array, "B T D"],
        attention=None,
        cos=None,
        sin=None,
        kernels: str = "xla",
    ) -> Float[Array, "B M"]:
        """Layer `index`'s predicted key-block scores; `attention`, `cos`, `sin` (the layer's
        attention module and RoPE tables) and `kernels` are read by the `heads` architecture
        only."""
        return self.layer(index)(x, attention, cos, sin, kernels)

    def token_scores(self, index, x: Float[Array, "B T D"]) -> Float[Array, "B T"]:
        """Layer `index`'s predicted MLP token scores from its normalised MLP input."""
        if not self.config.mlp:
            raise ValueError("these predictors have no MLP token scorers (PredictorConfig.mlp)")
        return self.layer(index).mlp_tokens(x)


def save_predictor(predictor: BlockScorePredictor, directory: str | Path) -> Path:
    """Writes the config (JSON) and the stacked weights (safetensors) into `directory`."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {
        ".".join(str(part) for part in path): np.asarray(variable.get_value())
        for path, variable in nnx.to_flat_state(nnx.state(predictor, PredictorParam))
    }
    save_file(weights, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(predictor.config)))
    return directory


def load_predictor(directory: str | Path, *, expected: PredictorConfig) -> BlockScorePredictor:
    """The predictors saved in `directory`; a `UserError` (one line) if there are none or they
    were made for another model shape than `expected`."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise UserError(
            f"lemo.predictor_path={str(directory)!r} holds no predictors "
            f"({CONFIG_FILE} and {WEIGHTS_FILE}); train them with scripts/train_predictor.py"
        )
    try:
        fields = json.loads((directory / CONFIG_FILE).read_text())
        fields.setdefault("architecture", "chunks")  # saved before there was a choice
        saved = PredictorConfig(**fields)
    except (TypeError, ValueError) as error:
        raise UserError(f"{directory / CONFIG_FILE} is not a predictor config: {error}") from None
    if saved.architecture == "heads" == expected.architecture:
        expected = dataclasses.replace(expected, heads=saved.heads)  # the selection's own count
    if saved != expected:
        raise UserError(
            f"the predictors in {directory} were made for {saved}, but this run needs {expected}"
        )
    predictor = nnx.eval_shape(lambda: BlockScorePredictor(saved, nnx.Rngs(0)))
    weights = load_file(str(directory / WEIGHTS_FILE))
    state = nnx.state(predictor, PredictorParam)
    for path, variable in nnx.to_flat_state(state):
        name = ".".join(str(part) for part in path)
        if name not in weights or weights[name].shape != variable.get_value().shape:
            raise UserError(f"{directory / WEIGHTS_FILE} lacks {name} of the expected shape")
        variable.set_value(jnp.asarray(weights[name]))
    nnx.update(predictor, state)
    return predictor
