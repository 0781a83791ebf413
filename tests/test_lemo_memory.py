"""LeMo's point: activation memory falls with the budget (compiled, no recomputation); one
compilation serves every training step."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from lora_training import mean_loss

from lemo_jax.configs import LoraConfig, get_model_config
from lemo_jax.configs.run import TrainSection
from lemo_jax.lemo.budgets import elimination_plan
from lemo_jax.lemo.config import LemoConfig
from lemo_jax.model import Llama, trainable_filter
from lemo_jax.train.optimizer import learning_rate_schedule, make_optimizer
from lemo_jax.train.step import init_state, make_train_step

CONFIG = dataclasses.replace(
    get_model_config("tiny"),
    num_layers=16,
    model_dim=128,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    mlp_dim=384,
    compute_dtype="float32",
)
LORA = LoraConfig(rank=4)
LENGTH = 4096


def compiled_temp_mib(plan, remat: str = "none") -> float:
    model = nnx.eval_shape(lambda: Llama(CONFIG, lora=LORA, rngs=nnx.Rngs(0)))
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(LORA), ...)
    loss = mean_loss(graphdef, remat_policy=remat, loss_chunk_size=1024, plan=plan)

    token_ids = jax.ShapeDtypeStruct((1, LENGTH), jnp.int32)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(trainable, frozen, token_ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def plan_for(schedule: str, mlp: str = "dense"):
    config = LemoConfig(enabled=True, schedule=schedule, mlp=mlp, mlp_schedule=schedule)
    return elimination_plan(config, CONFIG.num_layers, LENGTH)


@pytest.fixture(scope="module")
def dense_mib() -> float:
    return compiled_temp_mib(None)


def test_paper_table_with_token_sparse_mlp_needs_at_most_065_of_dense(dense_mib):
    lemo_mib = compiled_temp_mib(plan_for("paper_table", "token_sparse"))
    assert lemo_mib <= 0.65 * dense_mib, (lemo_mib, dense_mib)


def test_memory_falls_with_the_keep_ratio(dense_mib):
    memory = [compiled_temp_mib(plan_for(f"uniform:{ratio}")) for ratio in (0.75, 0.5, 0.25)]
    assert dense_mib > memory[0] > memory[1] > memory[2]


def test_one_compilation_for_all_training_steps():
    model = Llama(CONFIG, lora=LORA, rngs=nnx.Rngs(0))
    train = TrainSection(seq_len=256, steps=4, learning_rate=1e-3, warmup_steps=0)
    optimizer = make_optimizer(train)
    graphdef, state = init_state(model, trainable_filter(LORA), optimizer, seed=0)
    plan = elimination_plan(
        LemoConfig(
            enabled=True,
            schedule="uniform:0.5",
            block_size=32,
            bucket_blocks=1,
            mlp="token_sparse",
            mlp_schedule="uniform:0.5",
        ),
        CONFIG.num_layers,
        256,
    )
    step = make_train_step(
        graphdef, optimizer, learning_rate_schedule(train), train, use_dropout=False, plan=plan
    )
    for seed in range(4):
        batch = jax.random.randint(jax.random.key(seed), (1, 1, 256), 0, CONFIG.vocab_size)
        state, metrics = step(state, batch)
        assert jnp.isfinite(metrics["loss"])
    assert step._cache_size() == 1


def test_pruned_layers_can_keep_their_compacted_activations():
    """`lemo.pruned_remat=none` stores pruned layers' activations while dense layers still
    recompute: more memory than full remat everywhere, less than no remat anywhere."""
    plan = plan_for("uniform:0.5")
    keep_pruned = dataclasses.replace(plan, pruned_remat="none")
    full = compiled_temp_mib(plan, remat="full")
    mixed = compiled_temp_mib(keep_pruned, remat="full")
    nothing = compiled_temp_mib(plan, remat="none")
    assert full < mixed <= nothing
