"""Thin entry points: python -m jobs.<name>."""
