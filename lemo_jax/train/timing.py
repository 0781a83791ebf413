"""Timed training steps on random weights of a run configuration's shape (benchmarks).

The model is created on the device with random weights (no checkpoint is read), the step is
compiled once, and `steps` optimizer steps on random tokens are timed one by one after
`warmup` untimed ones, each synchronised. The peak device memory is the process's peak, so a
benchmark measures one configuration per process (`scripts/benchmark.py` does).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from lemo_jax.configs.run import RunConfig
from lemo_jax.lemo.budgets import executed_budgets
from lemo_jax.lemo.layer import EliminationPlan
from lemo_jax.model.llama import Llama
from lemo_jax.model.lora import trainable_filter
from lemo_jax.model.rope import rotary_angles
from lemo_jax.train.memory import benchmark_model, benchmark_step
from lemo_jax.train.observe import compiled_memory_gib, peak_device_memory_gib
from lemo_jax.train.optimizer import make_optimizer
from lemo_jax.train.profile import profile_call
from lemo_jax.train.setup import model_config_for
from lemo_jax.train.step import init_state

GIB = 2**30


def model_flops_per_step(config: RunConfig) -> float:
    """The dense model's training FLOPs for one step, the same for every mode (LeMo's tokens/s
    then read as dense-equivalent work): matmuls of the linear layers and LM head (forward and
    input gradients; weight gradients too in full fine-tuning; LoRA's are negligible) plus causal
    attention (forward 2 T^2 N H per layer, backward twice that). Recomputation is not counted."""
    train = config.train
    model = model_config_for(config.model, seq_len=train.seq_len)
    D, F, V = model.model_dim, model.mlp_dim, model.vocab_size
    attention_width = model.num_heads * model.head_dim
    per_layer = 2 * D * attention_width + 2 * D * model.num_kv_heads * model.head_dim + 3 * D * F
    linear = model.num_layers * per_layer + D * V
    tokens = train.grad_accum * train.batch_size * train.seq_len
    passes = 6 if train.method == "full" else 4
    attention = 6 * model.num_layers * train.seq_len**2 * attention_width
    return passes * linear * tokens + attention * train.grad_accum * train.batch_size


def measure_step_time(
    config: RunConfig, *, steps: int = 3, warmup: int = 1, profile_dir: str | None = None
) -> dict:
    """Times `steps` training steps; returns seconds (best and median), tokens/s at the best
    step, the compile time, the compiled step's memory estimate and the peak device memory
    (GiB; None on backends that do not report it), the training state's size (weights,
    adapters and optimizer state; the peak minus it is the step's activation memory), the
    kept-token fraction, and under LeMo the
    token selection's time per step and its share of the median step. With `profile_dir`, one
    more step runs under the profiler (`lemo_jax.train.profile`) and its summary is returned
    as `profile`."""
    train = config.train
    lora = config.lora if train.method == "lora" else None
    model = benchmark_model(config)
    model_config = model.config
    optimizer = make_optimizer(train)
    graphdef, state = init_state(model, trainable_filter(lora), optimizer, train.seed)
    del model
    state_gib = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) / GIB
    step, plan = benchmark_step(config, graphdef, optimizer, model_config.num_layers)
    shape = (train.grad_accum, train.batch_size, train.seq_len)
    started = time.perf_counter()
    compiled = step.lower(state, jax.ShapeDtypeStruct(shape, jnp.int32)).compile()
    compile_s = time.perf_counter() - started
    batch = jax.random.randint(jax.random.key(train.seed), shape, 0, model_config.vocab_size)
    seconds = []
    for index in range(warmup + steps):
        started = time.perf_counter()
        state, metrics = compiled(state, batch)
        loss = float(metrics["loss"])  # synchronises
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
    profile = None
    if profile_dir is not None:
        (state, _), profile = profile_call(
            lambda: jax.block_until_ready(compiled(state, batch)), profile_dir
        )
    kept, selection_s = 1.0, None
    if plan is not None:
        kept = executed_budgets(
            config.lemo, model_config.num_layers, train.seq_len
        ).kept_fraction()[1]
        model = nnx.merge(graphdef, state.trainable, state.frozen)
        selection_s = token_selection_seconds(model, plan, train.batch_size, train.seq_len)
        del model
    best = min(seconds)
    return dict(
        step_s=best,
        median_step_s=statistics.median(seconds),
        tokens_per_s=train.grad_accum * train.batch_size * train.seq_len / best,
        peak_gib=peak_device_memory_gib(),
        state_gib=state_gib,
        compiled_gib=compiled_memory_gib(compiled),
        temp_gib=compiled.memory_analysis().temp_size_in_bytes / GIB,
        compile_s=compile_s,
        kept_fraction=kept,
        loss=loss,
        layer_groups=1 if plan is None else len(plan.groups),
        selection_s=selection_s,
        selection_share=None if selection_s is None else selection_s / statistics.median(seconds),
        **({} if profile is None else {"profile": profile}),
    )


def token_selection_seconds(
    model: Llama, plan: EliminationPlan, batch_size: int, seq_len: int, *, repeats: int = 5
) -> float:
    """LeMo's token selection per training step: one layer's scoring and top-k (the oracle's
    q/k projections and block scores, or the predictor), timed alone on a random residual
    stream, times the number of layers that eliminate attention tokens. The step runs it once
    per such layer, outside recomputation (the selection is never differentiated)."""
    groups = [group for group in plan.groups if group.attention_blocks is not None]
    if not groups:
        return 0.0
    config = model.config
    group = groups[0]
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch_size, seq_len))
    cos, sin = rotary_angles(config.rope, config.head_dim, positions)
    graphdef, state = nnx.split(model)

    @jax.jit
    def select(state, h):
        return nnx.merge(graphdef, state).select_attention_tokens(
            h, cos, sin, group.start, num_blocks=group.attention_blocks, plan=plan
        )

    shape = (batch_size, seq_len, config.model_dim)
    h = jax.random.normal(jax.random.key(0), shape, config.compute_jnp_dtype)
    select(state, h).block_until_ready()  # compile and warm up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        select(state, h).block_until_ready()
        seconds.append(time.perf_counter() - started)
    return min(seconds) * sum(group.stop - group.start for group in groups)
