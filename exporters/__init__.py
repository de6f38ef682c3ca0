"""Model registry, per-family adapters that patch transformers 5.x modules, and exporters."""
