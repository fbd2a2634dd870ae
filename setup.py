"""clara_jax: CLaRa (Continuous Latent Reasoning for RAG) in JAX/Flax, built for TPU pods."""

from setuptools import find_packages, setup

# Direct dependencies, pinned; requirements/constraints.txt pins everything they pull in.
INSTALL_REQUIRES = [
  "absl-py==2.5.1",
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  "ml-collections==1.1.0",
  "ml_dtypes==0.6.0",
  "numpy==2.4.6",
  "protobuf==7.36.2",  # sentencepiece_model_pb2, to edit tokenizer protos
  "sentencepiece==0.2.3",
  # Data: TFDS array_record datasets read through grain, without tensorflow.
  "tensorflow-datasets==4.9.10",
  "array-record==0.8.6",
  "grain==0.2.18",
  "importlib_resources==7.1.0",  # needed by tfds' etils.epath, not declared by it
  "etils[epath]==1.15.0",  # one path API for local and gs:// workdirs (clara_jax.paths)
  # Metrics: clu's TensorBoard writer needs tensorflow (the CPU build) and tensorboard.
  "clu==0.0.12",
  "tensorflow-cpu==2.21.0",
  "tensorboard==2.21.0",
  "matplotlib==3.11.2",  # logit-lens and loss-curve figures
  "gguf==0.19.0",  # reading and dequantizing GGUF files (import-gguf)
  "tqdm==4.70.1",  # progress of evaluate, lens, index and convert on a terminal
]

EXTRAS_REQUIRE = {
  # torch/transformers only build reference models in tests (HF import parity);
  # torch 2.13.0 is the CPU build available offline on the project's machines.
  "test": [
    "pytest==9.2.0",
    # launch/test.sh runs two workers: the suite is mostly single-threaded compiles.
    "pytest-xdist==3.8.0",
    # launch/test.sh lints and checks the formatting (ruff.toml) before the tests.
    "ruff==0.14.6",
    # The type check: `mypy` with mypy.ini at the repository root.
    "mypy==1.19.0",
    "torch==2.13.0",
    "transformers==5.23.0",
    "safetensors==0.8.0",
    "peft==0.21.2",
    # tests/test_demo.py executes colab/clara_jax_demo.ipynb in a python3 kernel.
    "nbclient==0.11.0",
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
    # The TPU compiler, for the plan test that compiles a step for a TPU slice (no
    # TPU needed: ahead-of-time only); the version jax[tpu]==0.10.2 pins.
    "libtpu==0.0.42.1",
    # tests/test_cloud_workdir.py: a run on gs:// against a local GCS emulator (epath
    # through gcsfs, orbax through TensorStore's GCS driver; no network).
    "gcp-storage-emulator==2026.7.19",
    "gcsfs==2026.8.2",
  ],
  # Reading official CLaRa checkpoints (.pth files) needs torch.
  "import": ["torch==2.13.0"],
  "tpu": ["jax[tpu]==0.10.2"],
}

setup(
  name="clara_jax",
  version="0.1.0",
  description="CLaRa retrieval-augmented generation with continuous latent reasoning, in JAX",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  packages=find_packages(
    include=["clara_jax", "clara_jax.*", "configs", "configs.recipes", "configs.recipes.*"]
  ),
  python_requires=">=3.11,<3.12",
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS_REQUIRE,
  entry_points={"console_scripts": ["clara-jax=clara_jax.cli:main"]},
)
