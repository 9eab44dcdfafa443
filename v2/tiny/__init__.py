"""Tiny Fast-dLLM-v2-format model trained on a synthetic GSM8K-style task."""
