"""Evaluation: answer and retrieval metrics, the evaluate job, the logit lens."""
