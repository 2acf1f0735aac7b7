"""The decoders as Flax linen modules whose ``"params"`` collection is the documented params pytree.

``Gemma3(config)`` and ``Olmoe(config)`` (:func:`module` picks the one for a config) declare exactly the
leaves of their family's ``param_shapes`` under the same names, blocks stacked on the leading layer axis, so
``module(config).apply({"params": params}, tokens)`` runs on what ``mtijax.load`` returns, and
``mtijax.forward`` is that call. The module's body is one ``lax.scan`` of :class:`Block` (one layer: the
family's ``block`` function over that layer's slice of ``params["layers"]``), split at the layers that carry
a residual transform (each part reads its layers from the whole stack in place, so a split copies no weights;
``mtijax.models.traversal`` walks the layers); the streamer applies the same :class:`Block` to each layer it
streams in.

Interventions stay call arguments, with ``mtijax.forward``'s semantics: captures, patches (``[L, ...]``
data, so a sweep is a ``vmap``), residual transforms and the router hook. The captured activations are also
sown into the ``"intermediates"`` collection (one entry per site, flax's 1-tuple) when the caller makes it
mutable; transforms and router hooks run outside the module context (:func:`outside_modules`). ``layout`` is a
module attribute: ``"fused_qkv"`` declares ``layers/attn/qkv_proj`` in place of the
three projections (``mtijax.models.fused``). ``Module.init`` draws every leaf from a normal of std 0.02
(norms too), like ``mtijax.init_params``, from the ``"params"`` key folded with the top-level name.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtijax.config import Gemma3Config, LlamaConfig, ModelConfig, OlmoeConfig
from mtijax.errors import MtijaxError
from mtijax.interventions import Patch, RouterHook, Sites, check_sites
from mtijax.models import cache as kv
from mtijax.models.decoder import ForwardOutput, HiddenOutput, Params, ResidualTransform, family
from mtijax.models.fused import LAYOUT, fuse_qkv_shapes
from mtijax.models.traversal import Traversal

INIT_SCALE = 0.02
"""The standard deviation of ``Module.init``'s normal draws."""


def shapes(config: ModelConfig, layout: str = "params") -> Params:
    """The shape of every parameter in ``layout`` (``"params"``: the family's ``param_shapes``; ``"fused_qkv"``:
    with ``layers/attn/qkv_proj``), as a tree of tuples."""
    documented = family(config).param_shapes(config)
    if layout == "params":
        return documented
    if layout == LAYOUT:
        return fuse_qkv_shapes(documented)
    raise MtijaxError(f"unknown params layout {layout!r}; known: params, {LAYOUT}")


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple)


def normal_tree(dtype: Any = jnp.float32) -> Callable[[jax.Array, Any], Any]:
    """A flax initialiser of a whole subtree: ``init(key, shape_tree)`` -> arrays drawn from a normal of std
    :data:`INIT_SCALE`, one split key per leaf."""
    def init(key: jax.Array, shape_tree: Any) -> Any:
        leaves, treedef = jax.tree.flatten(shape_tree, is_leaf=_is_shape)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [jnp.asarray(INIT_SCALE, dtype) * jax.random.normal(k, s, dtype)
                                            for k, s in zip(keys, leaves)])
    return init


@contextlib.contextmanager
def _no_parent() -> Iterator[None]:
    """Make linen modules constructed in this block top-level (``parent=None``), as outside any module."""
    stack = nn.module._context.module_stack  # flax's own partitioning reads this stack too
    stack.append(None)
    try:
        yield
    finally:
        stack.pop()


def outside_modules(fn: Callable) -> Callable:
    """``fn`` run as if called from plain JAX code, not from inside a module's method: a residual transform or a
    router hook that builds a linen module and ``apply``-s it (``FusionLayer(config).apply(...)``) keeps working
    when the decoder is itself a module. Modules already bound (children of the caller's own module) are
    unaffected."""
    def run(*args: Any) -> Any:
        with _no_parent():
            return fn(*args)
    return run


class Block(nn.Module):
    """One decoder layer: its ``"params"`` are layer ``l`` of ``params["layers"]`` (``tree_map(lambda x: x[l],
    ...)``, in ``layout``), and its call is the family's ``block`` (see ``mtijax.models.gemma3.block``)."""

    config: ModelConfig
    layout: str = "params"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, spec: Mapping[str, jax.Array],
                 cache_kv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                 sites: Sites | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """``x [B, S, D]`` at ``positions [B, S]``, this layer's ``layer_spec`` slice and cache ``(k, v,
        positions)`` -> ``(x', (k, v))`` with this call's keys and values ``[B, S, K, H]``."""
        layer_shapes = jax.tree.map(lambda s: s[1:], shapes(self.config, self.layout)["layers"], is_leaf=_is_shape)
        init = normal_tree(self.param_dtype)
        layer = {name: self.param(name, init, shape) for name, shape in layer_shapes.items()}
        if sites is not None and sites.router is not None:
            fn, params, state = sites.router
            sites.router = (outside_modules(fn), params, state)
        return family(self.config).block(self.config, layer, spec, x, positions, cache_kv, sites, self.layout)


def block_apply(config: ModelConfig, layer: Params, spec: Mapping[str, jax.Array], x: jax.Array,
                positions: jax.Array, cache_kv: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                sites: Sites | None = None, layout: str = "params") -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """:class:`Block` applied to one layer's params ``layer``: what the layer scan and the streamer run."""
    return Block(config, layout, parent=None).apply({"params": layer}, x, positions, spec, cache_kv, sites)


def _keep_layers(num_layers: int, layers: Sequence[int] | None) -> np.ndarray | None:
    """For ``capture_layers``: ``[L]`` int32, the row of each kept layer in the capture buffer, -1 if not kept."""
    if layers is None:
        return None
    chosen = sorted(set(int(l) for l in layers))
    bad = [l for l in chosen if not 0 <= l < num_layers]
    if bad or not chosen:
        raise MtijaxError(f"capture layer {bad[0]} is out of range: the model has layers 0..{num_layers - 1}"
                          if bad else "capture_layers is empty")
    index = np.full((num_layers,), -1, np.int32)
    index[chosen] = np.arange(len(chosen), dtype=np.int32)
    return index


def _slot_selector(slots: jax.Array | None, batch: int) -> Callable[[jax.Array], jax.Array]:
    """For ``capture_slots [B, S']``: a function keeping those slots of an activation ``[B, S, ...]``."""
    if slots is None:
        return lambda value: value
    slots = jnp.broadcast_to(jnp.asarray(slots, jnp.int32), (batch, jnp.shape(slots)[-1]))
    return lambda value: jax.vmap(lambda row, index: row[index])(value, slots)


def _store(buffer: jax.Array, value: jax.Array, index: jax.Array) -> jax.Array:
    """Write ``value`` as row ``index`` of ``buffer`` (unchanged when ``index`` is -1)."""
    row = jnp.maximum(index, 0)
    old = jax.lax.dynamic_index_in_dim(buffer, row, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(buffer, jnp.where(index >= 0, value, old), row, 0)


class Decoder(nn.Module):
    """A decoder over the documented params: embed, one layer scan of :class:`Block`, final norm and head.

    ``__call__`` takes ``mtijax.forward``'s arguments after ``params`` and returns its
    :class:`~mtijax.models.decoder.ForwardOutput`; :meth:`hidden` stops before the head
    (:class:`~mtijax.models.decoder.HiddenOutput`, as ``mtijax.forward_hidden``).
    """

    config: ModelConfig
    layout: str = "params"
    param_dtype: Any = jnp.float32
    architecture = ""

    def setup(self) -> None:
        if self.architecture and self.config.architecture != self.architecture:
            raise MtijaxError(f"{type(self).__name__} is the {self.architecture} module, not "
                              f"{self.config.architecture}'s (use mtijax.models.module(config))")
        init = normal_tree(self.param_dtype)
        self.tree = {name: self.param(name, init, shape) for name, shape in shapes(self.config, self.layout).items()}

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, **options: Any) -> ForwardOutput:
        """``tokens [B, S]`` -> :class:`~mtijax.models.decoder.ForwardOutput`; ``options`` as ``mtijax.forward``."""
        out = self.hidden(tokens, positions, **options)
        logits = family(self.config).unembed(self.config, self.tree, out.hidden)
        return ForwardOutput(logits, out.cache, out.captured, out.router_state)

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None, *, cache: kv.KVCache | None = None,
               write_index: jax.Array | int = 0, capture: tuple[str, ...] = (),
               patches: Mapping[str, Patch] | None = None,
               transforms: Mapping[int, ResidualTransform] | None = None, router: RouterHook | None = None,
               capture_layers: Sequence[int] | None = None, capture_slots: jax.Array | None = None,
               keep_kv: bool = False, unroll: int | bool = 1) -> HiddenOutput:
        """The last residual stream ``[B, S, D]``, cache, captures and router state (see ``mtijax.forward``)."""
        config, params = self.config, self.tree
        arch = family(config)
        capture = check_sites(capture, architecture=arch)
        keep_layers = _keep_layers(config.num_layers, capture_layers)
        check_sites((patches or {}).keys(), patching=True, architecture=arch)
        b, s = tokens.shape
        if cache is not None and isinstance(write_index, int) and not 0 <= write_index <= cache.length - s:
            raise MtijaxError(f"cannot write {s} tokens at slot {write_index} of a {cache.length}-slot cache")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        layer_spec = arch.layer_spec(config)
        spec = jax.tree.map(jnp.asarray, layer_spec)
        transforms = {layer: outside_modules(fn) for layer, fn in (transforms or {}).items()}
        bad = [l for l in transforms if not (isinstance(l, int) and 0 <= l < config.num_layers)]
        if bad:
            raise MtijaxError(f"transform at layer {bad[0]!r} is out of range: the model has layers "
                              f"0..{config.num_layers - 1}")
        x = arch.embed(config, params, tokens)
        rolling = cache is not None and cache.ring is not None
        sliding = None if cache is None else kv.sliding_layers(cache, layer_spec["window"])
        cache_xs = None if cache is None or rolling else (cache.k, cache.v)
        visited: set[str] = set()
        keep = _slot_selector(capture_slots, b)

        def layer_step(x, layer, layer_spec_l, layer_cache, layer_patches, layer_router):
            if layer_cache is not None and len(layer_cache) == 2:  # the full layout scans keys and values only
                layer_cache = (*layer_cache, cache.positions)
            sites = Sites(capture, layer_patches, None if router is None else (router.fn, *layer_router))
            x, new_kv = block_apply(config, layer, layer_spec_l, x, positions, layer_cache, sites, self.layout)
            visited.update(sites.visited)
            return x, new_kv, {name: keep(value) for name, value in sites.captured.items()}, sites.router_state

        def step(carry, xs):
            x, kept = carry
            layer, layer_spec_l, layer_cache, layer_patches, layer_router, keep_index = xs
            x, new_kv, captured, router_state = layer_step(x, layer, layer_spec_l, layer_cache, layer_patches,
                                                           layer_router)
            if keep_layers is None:
                return (x, kept), (new_kv, captured, router_state)
            return (x, {n: _store(kept[n], captured[n], keep_index) for n in kept}), (new_kv, {}, router_state)

        if router is not None and router.state is None:
            router = outside_modules(router.start)(b)
        router_xs = None if router is None else (router.params, router.state)
        xs = (params["layers"], spec, cache_xs, dict(patches or {}), router_xs,
              None if keep_layers is None else keep_layers)

        traversal = Traversal(step, xs, config.num_layers, unroll, cache, sliding)
        kept = {}
        if keep_layers is not None:
            site_shapes = jax.eval_shape(lambda: layer_step(x, *traversal.layer_xs(0)[:5])[2])
            count = int((keep_layers >= 0).sum())
            kept = {n: jnp.zeros((count, *v.shape), v.dtype) for n, v in site_shapes.items()}

        segments = []
        start = 0
        for stop in sorted(transforms) + [config.num_layers - 1]:
            if stop < start:
                continue
            (x, kept), ys = traversal.run((x, kept), start, stop)
            segments.append(ys)
            if stop in transforms:
                x = transforms[stop](x, positions)
            start = stop + 1
        new_kv, captured, router_state = segments[0] if len(segments) == 1 else jax.tree.map(
            lambda *parts: jnp.concatenate(parts), *segments)
        if keep_layers is not None:
            captured = kept
        if router is not None and "router" not in visited:
            raise MtijaxError(f"a router hook needs a mixture-of-experts model; {config.architecture} has no router")
        if cache is not None:
            cache = kv.write(cache, *new_kv, positions, write_index, sliding)
        elif keep_kv:
            cache = kv.KVCache(*new_kv, positions)
        for name, value in captured.items():
            self.sow("intermediates", name, value)
        return HiddenOutput(x, cache, captured, router_state)


class Gemma3(Decoder):
    """The Gemma 3 decoder (``mtijax.models.gemma3``) as a linen module over its documented params."""

    config: Gemma3Config
    architecture = "gemma3"


class Olmoe(Decoder):
    """The OLMoE decoder (``mtijax.models.olmoe``) as a linen module over its documented params."""

    config: OlmoeConfig
    architecture = "olmoe"


class Llama(Decoder):
    """The Llama-line decoder (``mtijax.models.llama``: Llama 3, Mistral, Qwen 2/3) as a linen module over its
    documented params."""

    config: LlamaConfig
    architecture = "llama"


MODULES: dict[str, type[Decoder]] = {cls.architecture: cls for cls in (Gemma3, Olmoe, Llama)}
"""``config.architecture`` -> its linen module class."""


def module(config: ModelConfig, layout: str = "params") -> Decoder:
    """The linen module of ``config``'s architecture, over params in ``layout`` (unbound: ``.init`` or
    ``.apply`` it)."""
    family(config)  # an unknown architecture is a MtijaxError
    return MODULES[config.architecture](config, layout)
