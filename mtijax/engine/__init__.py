"""The generation engine: one chunked prefill and one decode step for every technique (see ``loop``)."""

from mtijax.engine.interventions import CacheEdit, Graft, Interventions, StepPatch
from mtijax.engine.ladder import Ladder, default_ladder
from mtijax.engine.loop import (LayerStack, Record, Resident, State, collect, compiled_counts, decode_block_size,
                                 row_keys, run, stream)
from mtijax.engine.request import Request, check_context, check_token_ids, lay_out, pad_prompts, stop_tokens
from mtijax.engine.sampling import Choice, Plain, Policy, Sampling, sample, sample_rows, suppress_mask
from mtijax.engine.tiers import settle_compiles

__all__ = [
    "CacheEdit", "Graft", "Interventions", "StepPatch", "Ladder", "default_ladder", "LayerStack", "Record", "Resident",
    "State", "collect", "compiled_counts", "decode_block_size", "row_keys", "run", "stream", "Request",
    "check_context", "check_token_ids", "lay_out", "pad_prompts",
    "stop_tokens", "Choice", "Plain", "Policy", "Sampling", "sample", "sample_rows", "suppress_mask", "settle_compiles",
]
