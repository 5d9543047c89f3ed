"""Machinery of the harness: datasets, label formats, models, training loop, evaluation, reports."""
