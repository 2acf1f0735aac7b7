"""Reading fields of a Hugging Face ``config.json`` or of GGUF metadata, with errors that name the file.

Each family's parser (``mtijax/models/<family>/config.py``) builds its config with these.
"""

from __future__ import annotations

from typing import Any, Mapping

from mtijax.errors import MtijaxError

_KIND_NAMES = {int: "an integer", float: "a number", tuple: "a list"}


def as_kind(kind: type, value: Any, name: str, where: str) -> Any:
    """``kind(value)``, or a MtijaxError naming the field and the file."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise MtijaxError(f"{where}: {name} must be {_KIND_NAMES[kind]}, got {value!r}") from None


def checked(where: str, kind: type, **values: Any) -> Any:
    """``kind(**values)``, with the file the values came from named in its complaints."""
    try:
        return kind(**values)
    except MtijaxError as e:
        raise MtijaxError(f"{where}: {e}") from None


def given(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` over ``defaults``, where an absent or null field takes the default."""
    return {**defaults, **{key: value for key, value in raw.items() if value is not None}}


def token_ids(value: Any, name: str, where: str) -> tuple[int, ...]:
    """An id or a list of ids (``eos_token_id``) as a tuple of ints."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(as_kind(int, i, name, where) for i in values)


def rope_section(raw: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The RoPE settings of a one-RoPE model: ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4)."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, Mapping):
        raise MtijaxError(f"{where}: RoPE settings must be an object, got {rope!r}")
    return rope


def rope_type(rope: Mapping[str, Any]) -> str:
    """``rope_type`` (or the older ``type``) of a RoPE section; ``"default"`` when absent."""
    return rope.get("rope_type", rope.get("type", "default"))


def linear_factor(rope: Mapping[str, Any], where: str) -> float:
    """The linear scaling factor of a RoPE section (1.0 for default RoPE); other types are refused."""
    kind = rope_type(rope)
    if kind == "default":
        return 1.0
    if kind == "linear":
        return as_kind(float, rope.get("factor"), "the linear RoPE factor", where)
    raise MtijaxError(f"{where}: RoPE type {kind!r} is not supported (default and linear are)")


def gguf_error(where: str, error: Exception) -> MtijaxError:
    """The error for GGUF metadata that is missing a key or holds a malformed value."""
    return MtijaxError(f"{where}: missing or malformed GGUF metadata {error}")
