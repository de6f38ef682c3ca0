"""turbo: Turbo token merging for ViT and BLIP, exported for fast inference."""

__version__ = "0.1.0"
