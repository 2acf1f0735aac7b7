"""Probe: per-layer decode cost of Gemma 3 12B shapes (batch 1, bf16), 8 layers per jit, by ablation."""
import dataclasses, time
import jax, jax.numpy as jnp
import mtijax
from mtijax.models.gemma3 import block, layer_spec
from mtijax.models.layers import rms_norm, gelu_tanh

def bench(name, fn, *args, nbytes):
    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    best = 1e9
    for _ in range(20):
        t0 = time.perf_counter(); jax.block_until_ready(f(*args)); best = min(best, time.perf_counter() - t0)
    print(f"{name:<40} {best*1e3/8:8.3f} ms/layer  {100*nbytes/best/3.0e12:4.0f}% of 3.0 TB/s", flush=True)

config = mtijax.preset("gemma3-12b")
cfg = dataclasses.replace(config, num_layers=8, layer_types=config.layer_types[:8])
k = jax.random.key(0)
params = mtijax.init_params(cfg, k, jnp.bfloat16)
L = params["layers"]
layer_bytes = 2 * (cfg.num_params - cfg.vocab_size * cfg.hidden_size) / 8
spec = jax.tree.map(jnp.asarray, layer_spec(cfg))
x0 = jax.random.normal(k, (1, 1, cfg.hidden_size), jnp.bfloat16)
pos = jnp.zeros((1, 1), jnp.int32)
cache = mtijax.init_cache(8, 1, 256, cfg.num_kv_heads, cfg.head_dim, jnp.bfloat16)
sl = lambda t, i: jax.tree.map(lambda a: a[i], t)

def full(L, x, c):
    for i in range(8):
        x = block(cfg, sl(L, i), sl(spec, i), x, pos, (c.k[i], c.v[i], c.positions))[0]
    return x
bench("full block (python loop)", full, L, x0, cache, nbytes=8 * layer_bytes)
def mlp_only(L, x):
    for i in range(8):
        m = sl(L["mlp"], i)
        n = rms_norm(x, L["pre_mlp_norm"][i], 1e-6)
        x = x + rms_norm((gelu_tanh(n @ m["gate_proj"]) * (n @ m["up_proj"])) @ m["down_proj"], L["post_mlp_norm"][i], 1e-6)
    return x
mlp_bytes = 2 * 3 * cfg.hidden_size * cfg.intermediate_size
bench("mlp half only", mlp_only, L, x0, nbytes=8 * mlp_bytes)
def mlp_dots(L, x):
    for i in range(8):
        m = sl(L["mlp"], i)
        x = x + ((x @ m["gate_proj"]) * (x @ m["up_proj"])) @ m["down_proj"]
    return x
bench("mlp dots only", mlp_dots, L, x0, nbytes=8 * mlp_bytes)
def attn_dots(L, x):
    for i in range(8):
        a = sl(L["attn"], i)
        q = x @ a["q_proj"]; kk = x @ a["k_proj"]; v = x @ a["v_proj"]
        x = x + (q + jnp.tile(kk + v, 2)) @ a["o_proj"]
    return x
attn_bytes = layer_bytes - mlp_bytes
bench("attn dots only", attn_dots, L, x0, nbytes=8 * attn_bytes)
def full_scan(L, x, c):
    def step(x, xs):
        l, s, ck, cv = xs
        return block(cfg, l, s, x, pos, (ck, cv, c.positions))[0], None
    return jax.lax.scan(step, x, (L, spec, c.k, c.v), unroll=True)[0]
bench("full block (scan unroll=True)", full_scan, L, x0, cache, nbytes=8 * layer_bytes)
