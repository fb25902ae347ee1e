"""Distributed InstanceFCN batch job on Ray Data: sources, stages, sinks."""
