"""The peer users run today, measured the same way as our steps: Hugging Face + PEFT.

`measure_hf_peft_step_time` builds transformers' `LlamaForCausalLM` with the run
configuration's shape and random weights (created on the device), SDPA attention, gradient
checkpointing (`use_reentrant=False`) when the run recomputes (`train.remat != "none"`), and
PEFT LoRA with the run's rank, alpha and targets; AdamW with the run's learning rate and betas;
batch 1 of random tokens, loss on all of them. Steps are timed like `lemo_jax.train.timing`
(synchronised, after warm-up) and the peak is `torch.cuda.max_memory_allocated()`. Compute is
bf16 on a GPU and float32 on a CPU (where this exists for tests). This is the setup of
reference-numbers.md; run it in its own process so its peak is its own.
"""

from __future__ import annotations

import statistics
import time

from lemo_jax.configs.run import RunConfig
from lemo_jax.io.hf_config import hf_config_from_model_config
from lemo_jax.train.setup import model_config_for

GIB = 2**30


def measure_hf_peft_step_time(config: RunConfig, *, steps: int = 3, warmup: int = 1) -> dict:
    """Same keys as `measure_step_time` where they apply (compile_s is 0: eager PyTorch)."""
    import peft
    import torch
    import transformers

    train, lora = config.train, config.lora
    model_config = model_config_for(config.model, seq_len=train.seq_len)
    hf_config = hf_config_from_model_config(model_config)
    hf_config._attn_implementation = "sdpa"
    hf_config.use_cache = False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(train.seed)
    with device:
        model = transformers.LlamaForCausalLM(hf_config).to(dtype)
    if train.remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.targets),
        ),
    )
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=train.learning_rate, betas=(train.adam_b1, train.adam_b2)
    )
    shape = (train.batch_size, train.seq_len)
    token_ids = torch.randint(0, model_config.vocab_size, shape, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, loss = [], None
    for index in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss_value = model(input_ids=token_ids, labels=token_ids).loss
        loss_value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(loss_value)  # synchronises
        if index >= warmup:
            seconds.append(time.perf_counter() - started)
    best = min(seconds)
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
    return dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        step_s=best,
        median_step_s=statistics.median(seconds),
        tokens_per_s=train.batch_size * train.seq_len / best,
        peak_gib=peak,
        compile_s=0.0,
        kept_fraction=1.0,
        loss=loss,
        implementation=f"transformers {transformers.__version__}, peft {peft.__version__}, "
        f"torch {torch.__version__}",
    )
