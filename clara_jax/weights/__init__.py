"""Reading and writing model weights: safetensors files, Hugging Face checkpoint import,
and saving/loading clara_jax decoders outside training."""
