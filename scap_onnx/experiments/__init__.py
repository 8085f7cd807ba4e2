"""Whole runs built on the pipeline and the evaluation: the sweep and the demo."""
