"""Embedding files: every layout read, the ones every client loads written, words installed into a model."""
