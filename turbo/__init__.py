"""turbo: Turbo token merging for ViT-family and BLIP models, exported for fast inference.

Layers, each importing only those below it (docs/architecture.md; tests/test_layers.py keeps it true):
core -> merging -> models, kernels -> graph, data -> quant -> runtimes -> export -> tools -> cli.
"""

__version__ = "0.1.0"
