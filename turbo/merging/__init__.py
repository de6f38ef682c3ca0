"""Turbo token merging: the algorithm only, pure torch, no model knowledge."""
