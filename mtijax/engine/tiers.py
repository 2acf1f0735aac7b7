"""Tiered compiles: while a program's tuned build compiles, its first calls run a quick build.

On a GPU most of a cold compile is XLA's autotuner timing candidate kernels: on the H200,
``--xla_gpu_autotune_level=0`` for the whole process brought the 270M's cold first token from 8.7 to 5.4 s, and
its batch-1 decode from 861-1 023 to 718 tok/s (README, "What compiling costs"). A :class:`Tiers` holds two jits
of one function: ``tuned`` (XLA's defaults) and ``quick`` (the autotuner off, :data:`QUICK_OPTIONS`).
:meth:`Tiers.start` builds both for one signature of arguments on a background thread, the quick one first, and
returns a :class:`Compiling`: its :meth:`~Compiling.program` is the jit to call now, the tuned one as soon as it
exists. Both builds take and return the same buffers, so a run moves from one to the other between two calls.

On by default on accelerators, off on the CPU (which has no autotuner: both builds would be the same program
compiled twice); ``MTIJAX_TIERED_COMPILE=1`` or ``=0`` decides instead. Off, :meth:`Tiers.start` builds the
tuned program alone, on the same background thread. The builds' threads are not daemons, so a process that ends right
after its first call waits for its tuned builds before it exits; they land in the persistent compilation cache,
and the next process starts with them. :func:`settle_compiles` waits for every build started so far.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Callable

import jax
import numpy as np

from mtijax.errors import MtijaxError

QUICK_OPTIONS = {"xla_gpu_autotune_level": 0}
"""The quick build's XLA options: no autotuning (each fusion and matrix product takes its default kernel)."""

_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="mtijax-compile-ahead")
_lock = threading.Lock()
_started: list["Compiling"] = []


def tiered_compile() -> bool:
    """Whether :meth:`Tiers.start` builds a quick program before the tuned one (see the module docstring)."""
    setting = os.environ.get("MTIJAX_TIERED_COMPILE")
    if setting is None:
        return jax.default_backend() != "cpu"
    if setting not in ("0", "1"):
        raise MtijaxError(f"MTIJAX_TIERED_COMPILE must be 0 or 1, not {setting!r}")
    return setting == "1"


def committed_devices(tree: Any) -> tuple:
    """The devices of the first leaf of ``tree`` committed to a device (``()`` if none is): where a jit called
    with these leaves runs, and so where its outputs are committed."""
    committed = next((leaf for leaf in jax.tree.leaves(tree) if getattr(leaf, "committed", False)), None)
    return () if committed is None else tuple(committed.sharding.device_set)


def signature(static: tuple, args: Any) -> tuple:
    """What decides which program a jit call runs, as a hashable key: the static arguments, the arguments' tree
    structure, and every leaf's shape, dtype and weak type (concrete or ``jax.ShapeDtypeStruct``), with the
    devices of the leaves committed to one (a jit's outputs are committed when any of its inputs is)."""
    leaves, treedef = jax.tree.flatten(args)
    return (static, treedef, committed_devices(leaves),
            tuple((tuple(leaf.shape) if isinstance(leaf, jax.ShapeDtypeStruct) else np.shape(leaf),
                   str(getattr(leaf, "dtype", type(leaf))), getattr(leaf, "weak_type", False)) for leaf in leaves))


class Compiling:
    """The builds of one program signature: ``quick`` (``None`` when not tiered) and ``tuned``, futures that
    finish when their build is in the jit's caches."""

    def __init__(self, tiers: "Tiers", tiered: bool) -> None:
        self.tiers = tiers
        self.quick: concurrent.futures.Future | None = concurrent.futures.Future() if tiered else None
        self.tuned: concurrent.futures.Future = concurrent.futures.Future()

    def ready(self) -> None:
        """Wait until a build can run (the quick one where tiered); raise its compile error if it failed."""
        (self.quick or self.tuned).result()

    def available(self) -> bool:
        """Whether a build has finished without error, so that :meth:`program` runs without compiling."""
        return any(future is not None and future.done() and future.exception() is None
                   for future in (self.quick, self.tuned))

    def program(self) -> Callable:
        """The jit to call now: the tuned one once built (or when not tiered), else the quick one."""
        if self.quick is None or (self.tuned.done() and self.tuned.exception() is None):
            return self.tiers.tuned
        return self.tiers.quick


class Tiers:
    """Two jits of ``fn`` with the same ``jax.jit`` arguments: ``tuned`` and ``quick`` (:data:`QUICK_OPTIONS`)."""

    def __init__(self, fn: Callable, **jit_arguments: Any) -> None:
        self.tuned = jax.jit(fn, **jit_arguments)
        self.quick = jax.jit(fn, compiler_options=QUICK_OPTIONS, **jit_arguments)
        self._by_key: dict[tuple, Compiling] = {}

    def start(self, key: tuple, lower: Callable[[Callable], Any]) -> Compiling:
        """Build the program ``lower(jit)`` lowers (``jit``: ``self.quick``, then ``self.tuned``; not tiered, the
        tuned one alone) on a background thread, once per ``key`` (:func:`signature`); a later ``start`` of the
        same key returns the same :class:`Compiling`."""
        tiered = tiered_compile()
        with _lock:
            if (key, tiered) in self._by_key:
                return self._by_key[key, tiered]
            compiling = Compiling(self, tiered)
            self._by_key[key, tiered] = compiling
            _started.append(compiling)
        builds = [(compiling.quick, self.quick)] if compiling.quick is not None else []
        builds.append((compiling.tuned, self.tuned))

        def build() -> None:
            for future, jit in builds:
                try:
                    lower(jit).compile()
                except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the build
                    for pending, _ in builds:
                        if not pending.done():
                            pending.set_exception(error)
                    return
                future.set_result(None)

        _pool.submit(build)
        return compiling

    def clear_cache(self) -> None:
        """Forget every build (both jits' caches and the started signatures)."""
        self.tuned.clear_cache()
        self.quick.clear_cache()
        with _lock:
            self._by_key.clear()

    def cache_size(self) -> int:
        """How many programs the two jits hold."""
        return self.tuned._cache_size() + self.quick._cache_size()


def settle_compiles() -> None:
    """Wait until every build started so far has finished (failed builds included), so that from here on every
    call runs a tuned program: before timing steady speed, for instance."""
    with _lock:
        pending = list(_started)
    concurrent.futures.wait([compiling.tuned for compiling in pending])
