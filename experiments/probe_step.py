"""Probe: 12B decode-step time, separating the pieces around the layer stack (batch 1, bf16)."""
import functools, time
import jax, jax.numpy as jnp
import mtijax
from mtijax.models.gemma3 import forward_hidden, unembed, embed

size = "gemma3-12b"
config = mtijax.preset(size)
params = mtijax.init_params(config, jax.random.key(0), jnp.bfloat16)
bound_ms = 2 * config.num_params / 3.0e12 * 1e3
N = 32

def report(name, seconds):
    ms = seconds / N * 1e3
    print(f"{name:<48} {ms:7.2f} ms/step  {100 * bound_ms / ms:4.0f}% of bound", flush=True)

def loop_time(body, init):
    f = jax.jit(lambda p, s: jax.lax.fori_loop(0, N, functools.partial(body, p), s))
    jax.block_until_ready(f(params, init))
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter(); jax.block_until_ready(f(params, init)); best = min(best, time.perf_counter() - t0)
    return best

cache = mtijax.init_cache(config.num_layers, 1, 256, config.num_kv_heads, config.head_dim, jnp.bfloat16)
tok = jnp.zeros((1,), jnp.int32)

def full(p, i, s):
    c, t = s
    x, c, _ = forward_hidden(config, p, t[:, None], jnp.full((1, 1), i, jnp.int32), cache=c, write_index=i, unroll=True)
    return c, jnp.argmax(unembed(config, p, x[:, -1]), -1).astype(jnp.int32)
report("fori: full step (cache, unroll)", loop_time(full, (cache, tok)))

def nocache(p, i, t):
    x, _, _ = forward_hidden(config, p, t[:, None], jnp.full((1, 1), i, jnp.int32), unroll=True)
    return jnp.argmax(unembed(config, p, x[:, -1]), -1).astype(jnp.int32)
report("fori: no cache (unroll)", loop_time(nocache, tok))

def nohead(p, i, t):
    x, _, _ = forward_hidden(config, p, t[:, None], jnp.full((1, 1), i, jnp.int32), unroll=True)
    return (x[:, -1, 0] > 0).astype(jnp.int32) + t
report("fori: no cache, no head (unroll)", loop_time(nohead, tok))

def head_only(p, i, t):
    x = embed(config, p, t[:, None])
    return jnp.argmax(unembed(config, p, x[:, -1]), -1).astype(jnp.int32)
report("fori: embed + head only", loop_time(head_only, tok))

step = jax.jit(full, donate_argnums=(2,))
s = (cache, tok)
s = step(params, 0, s); jax.block_until_ready(s)
t0 = time.perf_counter()
for i in range(N):
    s = step(params, i, s)
jax.block_until_ready(s)
report("python loop of jitted steps (donated cache)", time.perf_counter() - t0)
