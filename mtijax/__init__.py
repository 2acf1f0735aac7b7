"""mtijax: Gemma 3 as pure JAX functions of parameter pytrees, for research transforms."""
