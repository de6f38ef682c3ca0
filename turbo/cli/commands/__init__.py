"""Command bodies: called by app.py after parsing."""
