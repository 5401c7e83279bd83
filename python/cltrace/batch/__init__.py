"""Batch tracing: many prompts, local worker processes or a Ray cluster (see README.md)."""
