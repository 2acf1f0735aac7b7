"""Decoder architectures, each pure functions over a params pytree: one folder per family (``gemma3/``,
``olmoe/``, ``llama/``) with its :class:`~mtijax.models.architecture.Architecture` record, the registry
(``architectures``), and the shared layers, cache and forward pass."""
