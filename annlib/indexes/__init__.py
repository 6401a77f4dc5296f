"""Index families: one module per family; each validates, owns its state and calls kernels."""
