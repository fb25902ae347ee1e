"""The one Delta table `OUT/segments`: its schema and views, data files, fenced commits,
the lease, checks and repair, read_output, and kill points for the tests.
Imports no torch and nothing of the stages or planning.
"""
