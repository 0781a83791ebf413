"""The compiled training step's memory, without allocating the model (`memory_analysis()`)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from lemo_jax.configs.run import RunConfig
from lemo_jax.lemo.budgets import elimination_plan
from lemo_jax.model.llama import Llama
from lemo_jax.model.lora import trainable_filter
from lemo_jax.train.observe import compiled_memory_gib
from lemo_jax.train.optimizer import learning_rate_schedule, make_optimizer
from lemo_jax.train.setup import attach_predictors, model_config_for
from lemo_jax.train.step import TrainState, make_train_step

GIB = 2**30


def benchmark_model(config: RunConfig) -> Llama:
    """The run's model with random weights, and untrained block-score predictors where its
    LeMo uses predictors (same shapes, same cost): what the benchmarks measure. Under
    `nnx.eval_shape` nothing is allocated."""
    train = config.train
    lora = config.lora if train.method == "lora" else None
    model_config = model_config_for(config.model, seq_len=train.seq_len)
    model = Llama(model_config, lora=lora, rngs=nnx.Rngs(train.seed))
    attach_predictors(model, config.lemo, random_seed=train.seed)
    return model


def benchmark_step(config: RunConfig, graphdef: nnx.GraphDef, optimizer, num_layers: int):
    """(the run's jitted train step without dropout, its LeMo plan or None)."""
    train = config.train
    plan = elimination_plan(config.lemo, num_layers, train.seq_len)
    step = make_train_step(
        graphdef, optimizer, learning_rate_schedule(train), train, use_dropout=False, plan=plan
    )
    return step, plan


def compiled_step_memory(config: RunConfig) -> dict:
    """Compiles the run's train step on abstract shapes and returns its memory figures (GiB),
    the compile time (s) and the number of layer groups the step scans over."""
    train = config.train
    model = nnx.eval_shape(lambda: benchmark_model(config))
    lora = config.lora if train.method == "lora" else None
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(lora), ...)
    optimizer = make_optimizer(train)
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=jax.eval_shape(optimizer.init, trainable),
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
    )
    step, plan = benchmark_step(config, graphdef, optimizer, model.config.num_layers)
    batch = jax.ShapeDtypeStruct((train.grad_accum, train.batch_size, train.seq_len), jnp.int32)
    started = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - started
    analysis = compiled.memory_analysis()
    return dict(
        temp_gib=analysis.temp_size_in_bytes / GIB,
        argument_gib=analysis.argument_size_in_bytes / GIB,
        output_gib=analysis.output_size_in_bytes / GIB,
        alias_gib=analysis.alias_size_in_bytes / GIB,
        total_gib=compiled_memory_gib(compiled),
        compile_s=seconds,
        layer_groups=1 if plan is None else len(plan.groups),
    )
