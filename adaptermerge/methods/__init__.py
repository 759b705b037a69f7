"""Merge methods: one module per family and a registry."""
