"""Probe: where decode time goes for Gemma 3 12B shapes (batch 1, bf16)."""
import functools, time
import jax, jax.numpy as jnp, numpy as np
import mtijax
from mtijax.models.gemma3 import block, layer_spec, forward_hidden

BW = 3.0e12
def bench(name, fn, *args, nbytes):
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    best = 1e9
    for _ in range(20):
        t0 = time.perf_counter(); jax.block_until_ready(f(*args)); best = min(best, time.perf_counter() - t0)
    print(f"{name:<44} {best*1e3:8.3f} ms  {nbytes/best/1e9:7.0f} GB/s  ({100*nbytes/best/BW:4.0f}% of 3.0 TB/s)", flush=True)

D, F = 3840, 15360
k = jax.random.key(0)
x = jax.random.normal(k, (1, D), jnp.bfloat16)
W = jax.random.normal(k, (D, F), jnp.bfloat16)
Wt = jax.random.normal(k, (F, D), jnp.bfloat16)
nb = D * F * 2
bench("gemv x@W [D,F]", lambda x, W: x @ W, x, W, nbytes=nb)
bench("gemv x@Wt.T [F,D]", lambda x, W: jnp.einsum("bd,fd->bf", x, W), x, Wt, nbytes=nb)
bench("gemv x@W f32 acc", lambda x, W: jnp.einsum("bd,df->bf", x, W, preferred_element_type=jnp.float32), x, W, nbytes=nb)
L = 16
Ws = jax.random.normal(k, (L, D, F), jnp.bfloat16)
def scan_gemv(x, Ws, unroll):
    def step(c, w):
        return c, (x @ w)[:, :8]
    return jax.lax.scan(step, 0, Ws, unroll=unroll)[1]
bench("scan 16 gemv [L,D,F]", functools.partial(scan_gemv, unroll=1), x, Ws, nbytes=nb * L)
bench("scan 16 gemv unrolled", functools.partial(scan_gemv, unroll=True), x, Ws, nbytes=nb * L)
bench("python loop 16 gemv (static slices)", lambda x, Ws: [(x @ Ws[i])[:, :8] for i in range(L)], x, Ws, nbytes=nb * L)
del Ws
config = mtijax.preset("gemma3-12b")
import dataclasses
cfg = dataclasses.replace(config, num_layers=8, layer_types=config.layer_types[:8])
params = mtijax.init_params(cfg, k, jnp.bfloat16)
layer_bytes = 2 * (cfg.num_params - cfg.vocab_size * cfg.hidden_size) / 8
spec = jax.tree.map(lambda a: jnp.asarray(a[0]), layer_spec(cfg))
one = jax.tree.map(lambda a: a[0], params["layers"])
xx = jax.random.normal(k, (1, 1, cfg.hidden_size), jnp.bfloat16)
pos = jnp.zeros((1, 1), jnp.int32)
bench("one block, no cache", lambda l, x: block(cfg, l, spec, x, pos)[0], one, xx, nbytes=layer_bytes)
cache = mtijax.init_cache(8, 1, 256, cfg.num_kv_heads, cfg.head_dim, jnp.bfloat16)
ckv = (cache.k[0], cache.v[0], cache.positions)
bench("one block, cache 256", lambda l, x, c: block(cfg, l, spec, x, pos, c)[0], one, xx, ckv, nbytes=layer_bytes)
tok = jnp.zeros((1, 1), jnp.int32)
bench("8-layer forward_hidden, cache 256", lambda p, c: forward_hidden(cfg, p, tok, pos, cache=c, write_index=0)[0], params, cache, nbytes=8 * layer_bytes)
bench("8-layer forward_hidden, no cache", lambda p: forward_hidden(cfg, p, tok, pos)[0], params, nbytes=8 * layer_bytes)
emb = params["embed"]
bench("logits x @ embed.T [V,D]", lambda x, e: jnp.einsum("bd,vd->bv", x, e, preferred_element_type=jnp.float32), x, emb, nbytes=emb.size * 2)
