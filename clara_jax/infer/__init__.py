"""Inference: KV-cache generation and the document-memory index."""
