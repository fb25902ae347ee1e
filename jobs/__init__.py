"""Thin entry points: console scripts ifcn-<name> (pyproject [project.scripts]), or python -m jobs.<name>."""
