"""The Ray Data graph's stages, each a small callable: read and decode, infer (GPU/CPU
actors), hand off columns, encode RLE strings, stage fragments for publishing.
Read, encode and publish import no torch (tests/test_stage_imports.py).
"""
