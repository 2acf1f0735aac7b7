"""SMF: a small memory bank of 16-dimensional summaries, written while training and read by attention.

The bank (``smf_slots`` slots of ``smf_dim`` numbers, with an age and a fill count) lives in the Flax
collection ``memory``, beside the params: it is state, not trained by gradients, and it is saved with
them. A training step *writes* one slot (the mean over the batch's non-padding tokens of ``W_write x``,
times ``importance`` 0.8; every age grows by one; the slot is the next empty one, or the oldest) and then
every token *reads* the bank: ``query = W_query x``, slots decayed by ``exp(-decay age)``, softmax of
``query . slot`` over the filled slots, and ``W_read`` of the weighted sum; the fusion layer adds 0.05
times that. An empty bank reads as zero. Evaluation and generation only read.

As in the original, the slot written in a step is visible to that step's read, which is the only way
``W_write`` receives a gradient (through the slot just written; older slots are constants). It also means
that during training every token can see a 16-number summary of its whole batch, later tokens included.
Held-out evaluation and generation never write, so they are not affected.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class SemanticMemory(nn.Module):
    """``x [B, S, D]``, ``valid [B, S]`` -> the memory read ``[B, S, D]``; writes first when ``store``.

    Params: ``write`` (D -> dim), ``query`` (D -> dim), ``read`` (dim -> D). Memory collection:
    ``bank [slots, dim]``, ``ages [slots]``, ``count`` (int32, filled slots).
    """

    slots: int = 1000
    dim: int = 16
    decay: float = 0.01
    importance: float = 0.8

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, store: bool = False) -> jax.Array:
        bank = self.variable("memory", "bank", jnp.zeros, (self.slots, self.dim), jnp.float32)
        ages = self.variable("memory", "ages", jnp.zeros, (self.slots,), jnp.float32)
        count = self.variable("memory", "count", jnp.zeros, (), jnp.int32)
        write = nn.Dense(self.dim, name="write")
        slots, slot_ages, filled = bank.value, ages.value, count.value
        if store:
            weight = valid.astype(x.dtype)[..., None]
            summary = self.importance * jnp.sum(write(x) * weight, (0, 1)) / jnp.maximum(jnp.sum(weight), 1.0)
            slot_ages = slot_ages + 1
            slot = jnp.where(filled < self.slots, filled, jnp.argmax(slot_ages))
            slots = slots.at[slot].set(summary)
            slot_ages = slot_ages.at[slot].set(0.0)
            filled = jnp.minimum(filled + 1, self.slots)
            bank.value, ages.value, count.value = jax.lax.stop_gradient(slots), slot_ages, filled
        elif self.is_initializing():
            write(x)  # create its params
        decayed = slots * jnp.exp(-self.decay * slot_ages)[:, None]
        scores = nn.Dense(self.dim, name="query")(x) @ decayed.T
        scores = jnp.where(jnp.arange(self.slots) < filled, scores, jnp.finfo(scores.dtype).min)
        read = nn.Dense(x.shape[-1], name="read")(jax.nn.softmax(scores, axis=-1) @ decayed)
        return jnp.where(filled > 0, read, 0.0)
