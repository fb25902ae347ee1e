"""Tooling beside the method: pictures of proposals (PIL only) and the counter of what a code
path would launch on a GPU (ops, syncs, bytes). Imports nothing above ifcn.ops.
"""
