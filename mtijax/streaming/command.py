"""``mtijax generate --stream``: the streaming flags and the streamed generation behind them.

With ``--stream`` the text is printed once generation has finished (not token
by token), so a failure half-way (a shard truncated while in use, say) prints
only the error line and no partial text. The stream report (peak device
memory, bytes streamed, cache hit rate, effective GB/s) goes to stderr, or
under ``"stream"`` with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mtijax.arguments import encode_prompt, non_negative
from mtijax.errors import MtijaxError
from mtijax.streaming.memory import check_one_layer, parse_size

DEFAULT_HOST_CACHE_LAYERS = 8
DEFAULT_PREFETCH = 2


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except MtijaxError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--stream``, ``--host-cache-layers``, ``--prefetch`` and ``--max-device-memory`` to ``generate``."""
    group = parser.add_argument_group("layer streaming")
    group.add_argument("--stream", action="store_true",
                       help="stream the layers from disk instead of loading the model onto the device")
    group.add_argument("--host-cache-layers", type=non_negative(int), default=None,
                       help=f"layers kept in host memory (default {DEFAULT_HOST_CACHE_LAYERS}; 0: none)")
    group.add_argument("--prefetch", type=non_negative(int), default=None,
                       help=f"layers read and copied ahead of the compute (default {DEFAULT_PREFETCH}; 0: none)")
    group.add_argument("--max-device-memory", type=_size, default=None,
                       help="refuse to start if streaming would need more device memory, e.g. 4GB or 512MiB "
                            "(default: no cap); checked before any layer is read")


def wants_streaming(args: argparse.Namespace) -> bool:
    """Whether ``--stream`` was given; streaming flags without it are an error."""
    given = [flag for flag, value in (("--host-cache-layers", args.host_cache_layers), ("--prefetch", args.prefetch),
                                      ("--max-device-memory", args.max_device_memory)) if value is not None]
    if given and not args.stream:
        raise MtijaxError(f"{given[0]} needs --stream")
    return args.stream


def run(args: argparse.Namespace, sampling, show_progress: bool = False) -> None:
    """Generate with the layers streamed; print the text, then the stream report.

    The store (headers only), the device-memory cap, the tokenizer and the prompt are checked before any layer
    is read.
    """
    from mtijax.api import Checkpoint
    from mtijax.preflight import check_prompts
    from mtijax.special_tokens import text_decoder
    from mtijax.streaming.runner import StreamedModel
    from mtijax.streaming.store import LayerStore

    store = LayerStore(args.model, args.dtype)
    check_one_layer(args.max_device_memory, store.resident_nbytes, store.layer_nbytes)
    checkpoint = Checkpoint(Path(store.location), store.config, store.source)
    tokenizer = checkpoint.tokenizer(show_progress) if args.token_ids is None else None
    prompt_ids = encode_prompt(tokenizer, store.location, args.prompt, args.token_ids)
    check_prompts(store.config, [prompt_ids], checkpoint.context_source, args.max_new_tokens)
    host_cache = DEFAULT_HOST_CACHE_LAYERS if args.host_cache_layers is None else args.host_cache_layers
    prefetch = DEFAULT_PREFETCH if args.prefetch is None else args.prefetch
    start = time.perf_counter()
    with StreamedModel(store, host_cache_layers=host_cache, prefetch=prefetch,
                       max_device_memory=args.max_device_memory) as model:
        suppress = None if args.sample_special else checkpoint.suppress_ids(tokenizer)
        generation = model.generate([prompt_ids], args.max_new_tokens, sampling=sampling, seed=args.seed,
                                    suppress_ids=suppress)
        stats = model.stats()
    elapsed = time.perf_counter() - start
    ids = generation.ids(0)
    decode = text_decoder(tokenizer, checkpoint.suppress_ids(tokenizer), args.show_special) \
        if tokenizer is not None else None
    text = decode(ids) if decode is not None else ""
    if args.json:
        print(json.dumps({"model": store.location, "prompt_ids": list(prompt_ids), "ids": ids, "text": text,
                          "seconds": round(elapsed, 3), "stream": stats.to_json()}))
        return
    print(text if decode is not None else " ".join(str(i) for i in ids))
    for line in stats.lines():
        print(f"stream: {line}", file=sys.stderr)
