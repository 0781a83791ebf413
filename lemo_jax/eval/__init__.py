"""Evaluation: perplexity (and, later, passkey retrieval)."""
