"""prompt_t5x: prompt tuning of frozen T5 (T5X-compatible) in JAX/Flax.

Dependency ranges admit both the CPU stack (jax 0.10.2, flax 0.12.8) and the GPU machine's
(jax 0.11.2, flax 0.12.10). The core (model, train step, checkpoints, bench) needs no TensorFlow;
the ``data`` extra brings SeqIO/TFDS for tasks/ and the data bridge.
"""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2,<0.12",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorstore>=0.1.86",
    "gin-config>=0.5.0,<0.6",
    "sentencepiece>=0.2.3,<0.3",
    "msgpack>=1.0",
    "safetensors>=0.4",
    "numpy>=1.26",
    "tqdm>=4.60",
]
DATA = [
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "scikit-learn>=1.3",
    "scipy>=1.10",
]
PLOT = ["matplotlib>=3.7"]
# Test references nobody here wrote: HF transformers/peft on PyTorch (CPU). torch is pinned
# exactly: the CPU build lies on the machine's disk; any other spec downloads GBs of CUDA.
# transformers 5.x ties lm_head to the embedding for every T5 (T5 1.1 is untied), so the
# reference must be 4.x.
REFERENCE = ["torch==2.13.0", "transformers>=4.40,<5", "peft>=0.13,<0.22"]
# pytest-xdist: the suite runs on 2 processes (CI has 2 cores; one process leaves one idle).
TEST = ["pytest>=7", "pytest-xdist>=3.5"] + DATA + PLOT + REFERENCE

setup(
    name="prompt_t5x",
    version="0.1.0",
    description="Prompt tuning of frozen T5 (T5X checkpoints) in JAX/Flax, CPU to TPU pod.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # gin/ stays at the top of the repo (T5X layout) and is installed as prompt_t5x/gin, where
    # gin_cli also looks, so --gin_file=runs/... works from any directory after a plain install.
    packages=find_packages(include=["prompt_t5x", "prompt_t5x.*", "tasks", "tasks.*"])
    + ["prompt_t5x.gin"],
    package_dir={"prompt_t5x.gin": "gin"},
    package_data={"prompt_t5x": ["assets/*"], "prompt_t5x.gin": ["*/*.gin"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={"data": DATA, "plot": PLOT, "reference": REFERENCE, "test": TEST,
                    "all": DATA + PLOT},
    entry_points={"console_scripts": ["prompt-t5x=prompt_t5x.commands.cli:main"]},
)
