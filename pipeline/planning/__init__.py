"""What a run will do before any work starts: listing prefixes, manifests and inventories
(Arrow columns), the run's listing snapshot, and the plan against the table's state.
Imports no torch. May import pipeline.tables and ifcn.io; never the stages.
"""
