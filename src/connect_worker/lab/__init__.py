"""The lab: demo, deploy simulator, soak, benchmarks, timeline pictures.

Nothing in the engine imports from here.
"""
