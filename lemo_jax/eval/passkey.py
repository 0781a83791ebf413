"""Passkey retrieval: can the model repeat a 5-digit key hidden at some depth in filler text?

The test of Mohtashami & Jaggi (2023, "Landmark Attention"), as LongLoRA and later long-context
work use it: an instruction, repeated filler sentences with one needle sentence ("The pass key
is 48213. Remember it. 48213 is the pass key.") at a chosen depth, then the question "What is
the pass key? The pass key is". A trial passes when greedy decoding continues with the key.

Greedy decoding emits the key exactly when, with the correct answer teacher-forced, the argmax
at every answer position is the answer's next token; so one forward pass per trial decides it
(no generation loop, no KV cache), batched over trials of the same length.

Prompts are built from token ids: the filler, needle and question are tokenised once (each
starts with a space, so joining them keeps the tokenisation a tokenizer would give the text,
except the one filler unit cut to hit the exact length), and every prompt of one length has
exactly that many tokens, so all trials of a length share one compiled shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from lemo_jax.errors import UserError
from lemo_jax.model.llama import Llama

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)
FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"
KEY_DIGITS = 5


@dataclasses.dataclass(frozen=True)
class PasskeyTrial:
    """One prompt: `token_ids` [T] end with the answer's tokens, which start at `answer_start`."""

    key: int
    depth: float  # where the needle starts, as a fraction of the filler
    token_ids: np.ndarray
    answer_start: int


def make_trials(tokenizer, seq_len: int, num_trials: int, *, seed: int = 0) -> list[PasskeyTrial]:
    """`num_trials` prompts of exactly `seq_len` tokens, needle depths evenly spread over
    (0, 1), keys drawn from a generator seeded by `seed` and `seq_len` (so each length has its
    own keys, and the same ones on every run)."""
    if num_trials < 1:
        raise UserError(f"the number of passkey trials must be positive, got {num_trials}")

    def encode(text: str) -> np.ndarray:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    # No BOS: the training pipeline joins documents with EOS and adds none.
    prefix = encode(INSTRUCTION)
    filler, question = encode(FILLER), encode(QUESTION)
    rng = np.random.default_rng([seed, seq_len])
    keys = rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS, size=num_trials)
    trials = []
    for index, key in enumerate(keys):
        needle, answer = encode(NEEDLE.format(key=key)), encode(ANSWER.format(key=key))
        filler_len = seq_len - prefix.size - needle.size - question.size - answer.size
        if filler_len < filler.size:
            raise UserError(
                f"passkey prompts need more than {seq_len - filler_len + filler.size} tokens; "
                f"{seq_len} is too short"
            )
        depth = (index + 0.5) / num_trials
        # Whole filler units, after the tail of one unit that makes up the exact length: the
        # text before the question ends with a whole sentence. The needle goes between units.
        remainder = filler_len % filler.size
        stream = np.concatenate(
            [filler[filler.size - remainder :], np.tile(filler, filler_len // filler.size)]
        )
        cut = remainder + int(depth * (filler_len - remainder)) // filler.size * filler.size
        token_ids = np.concatenate([prefix, stream[:cut], needle, stream[cut:], question, answer])
        trials.append(PasskeyTrial(int(key), depth, token_ids, seq_len - answer.size))
    return trials


# (token_ids [B, T], answer_start) -> greedy next-token predictions [B, A] for the positions
# that predict the A answer tokens (answer_start - 1 .. T - 2).
AnswerFn = Callable[[np.ndarray, int], np.ndarray]


def score_trials(
    predict: AnswerFn,
    trials: Sequence[PasskeyTrial],
    *,
    batch_size: int = 1,
    show_progress: bool = False,
) -> list[bool]:
    """Whether each trial's greedy answer is its key. Trials are batched `batch_size` at a time
    (all trials must have one length and one answer start); a short last batch is padded with
    copies of the first trial, so one shape is compiled."""
    if not trials:
        return []
    seq_len, answer_start = trials[0].token_ids.size, trials[0].answer_start
    if any(t.token_ids.size != seq_len or t.answer_start != answer_start for t in trials):
        raise ValueError("all trials of one call must have the same length and answer start")
    passed: list[bool] = []
    starts = range(0, len(trials), batch_size)
    for start in tqdm(starts, desc=f"passkey @ {seq_len}", disable=not show_progress):
        batch = list(trials[start : start + batch_size])
        count = len(batch)
        batch += [trials[0]] * (batch_size - count)
        token_ids = np.stack([trial.token_ids for trial in batch])  # [B, T]
        predicted = np.asarray(predict(token_ids, answer_start))  # [B, A]
        expected = token_ids[:, answer_start:]  # [B, A]
        passed.extend(bool(row) for row in np.all(predicted == expected, axis=1)[:count])
    return passed


@nnx.jit(static_argnames=("answer_start",))
def _greedy_answer(model: Llama, token_ids: jax.Array, answer_start: int) -> jax.Array:
    hidden = model.hidden_states(token_ids)  # [B, T, D]
    # Only the A positions that predict the answer go through the LM head.
    logits = model.logits(hidden[:, answer_start - 1 : -1])  # [B, A, V]
    return jnp.argmax(logits, axis=-1)


def model_answers(model: Llama) -> AnswerFn:
    """The greedy predictions of `model` (dense forward, compute dtype of its config)."""
    return lambda token_ids, answer_start: _greedy_answer(
        model, jnp.asarray(token_ids), answer_start
    )


def passkey_accuracy(
    model: Llama,
    tokenizer,
    seq_len: int,
    num_trials: int,
    *,
    batch_size: int = 1,
    seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """{"seq_len", "trials", "accuracy", "passed": [bool per trial], "depths", "keys"}."""
    trials = make_trials(tokenizer, seq_len, num_trials, seed=seed)
    passed = score_trials(
        model_answers(model), trials, batch_size=batch_size, show_progress=show_progress
    )
    return dict(
        seq_len=seq_len,
        trials=num_trials,
        accuracy=sum(passed) / num_trials,
        passed=passed,
        depths=[trial.depth for trial in trials],
        keys=[trial.key for trial in trials],
    )
