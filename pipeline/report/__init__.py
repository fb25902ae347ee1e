"""The report of a finished output: summary numbers, plots and one HTML page.
May import pipeline.tables and ifcn.evaluation / ifcn.tools.viz.
"""
