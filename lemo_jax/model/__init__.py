"""The Llama-family model.

Shape vocabulary, used in type hints, einsum strings and shape comments throughout lemo-jax:

    B batch            T query positions      S key positions
    N query heads      K kv heads             G heads per kv group (N / K)
    H head dim         D model dim            F MLP hidden dim
    V vocab            L layers               R retained tokens after elimination
    M blocks (64-token segments)
"""

from lemo_jax.model.llama import Llama
from lemo_jax.model.lora import count_params, trainable_filter

__all__ = ["Llama", "count_params", "trainable_filter"]
