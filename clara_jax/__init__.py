"""clara_jax: CLaRa (Continuous Latent Reasoning for RAG) in JAX/Flax."""

import os as _os

# TensorFlow (used for TFDS data and TensorBoard) logs a page of INFO lines at import;
# keep its warnings and errors. A value set by the user wins.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
