"""clara_jax: CLaRa (Continuous Latent Reasoning for RAG) in JAX/Flax."""

__version__ = "0.1.0"
