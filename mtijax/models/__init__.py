"""Decoder implementations; each is pure functions over a params pytree."""
