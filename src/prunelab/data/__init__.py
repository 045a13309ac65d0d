"""Datasets (placeholder, being written)."""
