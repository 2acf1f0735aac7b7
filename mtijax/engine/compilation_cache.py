"""JAX's persistent compilation cache, on by default on accelerators, under the mtijax cache directory.

Compiled programs are written to ``$MTIJAX_CACHE/xla`` (``MTIJAX_CACHE`` defaults to
``~/.cache/mtijax``), so a second process reuses the first one's compiles instead of paying them
again. ``MTIJAX_COMPILATION_CACHE=0`` switches it off, ``=1`` switches it on, and ``=/some/dir`` puts it
elsewhere. On the CPU backend it is off unless switched on: with jaxlib 0.10.2 on the CPU, the test suite's
process once died with a segmentation fault inside ``put_executable_and_time``. That process was by then
past the kernel's limit on memory maps, which the suite's compiled programs had used up
(``tests/conftest.py`` now frees them after each module), so the cache write may have been only where it
broke; the CPU default stays off until a long run with the cache on says otherwise. A cache directory the user set through JAX itself
(``jax_compilation_cache_dir``) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

_DONE = False


def cache_directory() -> Path | None:
    """Where compiled programs go, or None when the persistent cache is switched off."""
    setting = os.environ.get("MTIJAX_COMPILATION_CACHE", "")
    if setting.lower() in ("0", "off", "false", "no"):
        return None
    if not setting and jax.default_backend() == "cpu":
        return None
    if setting and setting.lower() not in ("1", "on", "true", "yes"):
        return Path(setting).expanduser()
    root = Path(os.environ.get("MTIJAX_CACHE", Path.home() / ".cache" / "mtijax")).expanduser()
    return root / "xla"


def enable_compilation_cache() -> Path | None:
    """Turn the persistent cache on (once per process); returns its directory, or None when off."""
    global _DONE
    directory = cache_directory()
    if _DONE or directory is None:
        return directory
    _DONE = True
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
