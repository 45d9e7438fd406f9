"""Evaluation: embeddings, zero-shot, linear probes, retrieval, metrics and reports."""
