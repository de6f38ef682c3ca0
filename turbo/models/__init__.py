"""Model families: the registry, one small adapter per family, loading checkpoints, patching in Turbo blocks."""
