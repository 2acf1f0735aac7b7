"""Probe: time of one decode step (batch 1) under layer-scan unroll settings; XLA_FLAGS from the environment."""
import functools, sys, time
import jax, jax.numpy as jnp, numpy as np
import mtijax
from mtijax.models.gemma3 import forward_hidden, unembed

def probe(size, unroll, steps=64, context=256):
    config = mtijax.preset(size)
    params = mtijax.init_params(config, jax.random.key(0), jnp.bfloat16)
    cache = mtijax.init_cache(config.num_layers, 1, context, config.num_kv_heads, config.head_dim, jnp.bfloat16)
    @functools.partial(jax.jit, static_argnums=(3,))
    def run(params, cache, token, n):
        def body(i, state):
            cache, token = state
            x, cache, _ = forward_hidden(config, params, token[:, None], jnp.full((1, 1), i, jnp.int32), cache=cache, write_index=i, unroll=unroll)
            return cache, jnp.argmax(unembed(config, params, x[:, -1]), -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, n, body, (cache, token))[1]
    tok = jnp.zeros((1,), jnp.int32)
    t0 = time.perf_counter(); run(params, cache, tok, steps).block_until_ready(); compile_s = time.perf_counter() - t0
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter(); run(params, cache, tok, steps).block_until_ready(); best = min(best, time.perf_counter() - t0)
    ms = best / steps * 1e3
    bound_ms = 2 * config.num_params / 3.0e12 * 1e3
    print(f"{size:<12} unroll={str(unroll):<5} {ms:7.3f} ms/step  {1e3/ms:7.1f} tok/s  bound {bound_ms:.3f} ms  {100*bound_ms/ms:5.1f}%  (first call {compile_s:.1f}s)", flush=True)
    del params, cache

for size in sys.argv[1].split(","):
    for unroll in (1, True):
        probe(size, unroll)
