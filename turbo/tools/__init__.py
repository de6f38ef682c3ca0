"""Workflows over exports: bench, eval, check."""
