"""Generation: :func:`generate` and :func:`generate_stream`, front-ends of the engine (``mtijax.engine``).

Prompts of different lengths are left-padded; padding has position -1 and is never attended to, so a
row's tokens do not depend on the other rows (each row also samples with its own key). Shapes come
from the compile ladder (``mtijax.engine.ladder``): a new prompt length or ``max_new_tokens`` reuses
the compiled prefill chunk and decode step. Decode steps run on
:func:`~mtijax.models.fused.fuse_qkv` params (one q/k/v matrix per layer, made once per call).

:func:`generate` dispatches the steps without waiting and returns all tokens at the end;
:func:`generate_stream` yields each step's tokens as they reach the host (the CLI prints text as it is
generated): one step at a time on the CPU, a decode block of 8 at a time on accelerators
(``mtijax.engine.loop.decode_block_size``). Both run the same compiled functions and give the same tokens.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import ModelConfig
from mtijax.engine import loop
from mtijax.engine.interventions import Interventions, check
from mtijax.engine.ladder import Ladder, default_ladder
from mtijax.engine.request import Request, check_token_ids, lay_out, pad_prompts, stop_tokens
from mtijax.engine import sampling as sampling_lib
from mtijax.engine.sampling import Plain, Policy, Sampling, suppress_mask
from mtijax.errors import MtijaxError
from mtijax.models.decoder import Params
from mtijax.models.fused import LAYOUT as FUSED, fuse_qkv

__all__ = ["Generation", "Sampling", "generate", "generate_stream", "check_token_ids", "pad_prompts", "sample",
           "stop_tokens", "start_run"]


class Generation(NamedTuple):
    """Generated tokens.

    Attributes:
      tokens: ``[B, N]`` int32; after a row's stop token the row holds the pad id.
      lengths: ``[B]`` tokens generated per row, the stop token included.
      stopped: ``[B]`` bool, whether the row ended with a stop token (it may
        be the row's last allowed token, so ``lengths`` alone cannot tell).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray

    def ids(self, row: int, *, keep_stop: bool = False) -> list[int]:
        """Row ``row``'s generated ids (without its stop token unless ``keep_stop``)."""
        ids = self.tokens[row, : self.lengths[row]].tolist()
        return ids[:-1] if self.stopped[row] and not keep_stop else ids


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling,
           suppress_ids: Sequence[int] | None = None) -> jax.Array:
    """Choose one token per row from float32 ``logits [B, V]`` with one key: ``[B]`` int32. ``suppress_ids`` are
    never chosen (their logits are -inf before anything else, greedy included)."""
    suppress = None if suppress_ids is None else jnp.asarray(suppress_mask(logits.shape[-1], suppress_ids))
    return sampling_lib.sample(logits, key, sampling, suppress)


def start_run(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
              policy: Policy, seed: int = 0, stop_ids: Sequence[int] | None = None,
              suppress_ids: Sequence[int] | None = None, interventions: Interventions | None = None,
              ladder: Ladder | None = None, record_logits: bool = False,
              ) -> tuple[Request, Iterator[tuple[loop.State, loop.Record]]]:
    """Check and lay out a request and start the engine on it (for front-ends): ``(request, steps)``.

    ``params`` is a params pytree on the device, or a param source with its own ``start_run`` (a
    ``mtijax.streaming.StreamedModel``, whose layers stream from disk or host memory), which then runs the
    same engine.
    """
    source = getattr(params, "start_run", None)
    if source is not None:
        if getattr(params, "config", config) != config:
            raise MtijaxError("the streamed model's config is not the config given")
        return source(prompts, max_new_tokens, policy=policy, seed=seed, stop_ids=stop_ids, suppress_ids=suppress_ids,
                      interventions=interventions, ladder=ladder, record_logits=record_logits)
    from mtijax.sharding.place import mesh_of

    if mesh_of(params) is not None:  # placed on a mesh: the engine with a sharded KV cache
        from mtijax.sharding.generation import start_run as start_sharded

        return start_sharded(config, params, prompts, max_new_tokens, policy=policy, seed=seed, stop_ids=stop_ids,
                             suppress_ids=suppress_ids, interventions=interventions, ladder=ladder,
                             record_logits=record_logits)
    interventions = Interventions() if interventions is None else interventions
    check(interventions, config)
    request = lay_out(config, prompts, max_new_tokens, ladder or default_ladder(), stop_ids,
                      edits_cache=interventions.cache_edit is not None)
    suppress = suppress_mask(config.vocab_size, suppress_ids)
    steps = loop.run(config, fuse_qkv(params), request, policy=policy, interventions=interventions,
                     seed=seed, suppress=suppress, record_logits=record_logits,
                     layout=FUSED)
    return request, steps


def generate(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             sampling: Sampling = Sampling(), seed: int = 0, stop_ids: Sequence[int] | None = None,
             suppress_ids: Sequence[int] | None = None, interventions: Interventions | None = None,
             ladder: Ladder | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` for each prompt (lists of token ids).

    Args:
      params: the params pytree, or a streamed param source (``mtijax.streaming.StreamedModel``).
      sampling: greedy (the default), temperature, top-k, top-p; row ``r`` samples with
        ``fold_in(key(seed), r)``.
      stop_ids: a row stops after it produces one of these (default: the config's EOS ids; ``()`` never).
      suppress_ids: ids that are never produced (their logits are -inf before any choice).
      interventions: patches, step patches, grafted transforms and a router hook
        (:class:`mtijax.engine.Interventions`), threaded through the prefill and every decode step.
      ladder: the compile ladder (default: :func:`mtijax.engine.ladder.default_ladder`).
    """
    request, steps = start_run(config, params, prompts, max_new_tokens, policy=Plain(sampling), seed=seed,
                               stop_ids=stop_ids, suppress_ids=suppress_ids, interventions=interventions,
                               ladder=ladder)
    run = loop.collect(steps, request, config.pad_token_id)
    return Generation(run.tokens, run.lengths, run.stopped)


def generate_stream(config: ModelConfig, params: Params, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int = 32, *, sampling: Sampling = Sampling(), seed: int = 0,
                    stop_ids: Sequence[int] | None = None, suppress_ids: Sequence[int] | None = None,
                    interventions: Interventions | None = None, ladder: Ladder | None = None,
                    ) -> Iterator[np.ndarray]:
    """Like :func:`generate`, but yields each step's ``[B]`` tokens as soon as they reach the host (in bursts of a
    decode block on accelerators).

    Rows that have stopped yield the pad id; iteration ends when every row has stopped or ``max_new_tokens``
    tokens were produced.
    """
    request, steps = start_run(config, params, prompts, max_new_tokens, policy=Plain(sampling), seed=seed,
                               stop_ids=stop_ids, suppress_ids=suppress_ids, interventions=interventions,
                               ladder=ladder)
    for _, record in loop.stream(steps, request):
        yield np.asarray(record.token)[:request.batch]
