"""Prefect tasks: thin wrappers around sngp_models, one module per pipeline stage."""
