"""jaxprm: vision-language process reward models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="jaxprm",
    version="0.1.0",
    description="Train and use vision-language process reward models (VL-PRMs) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["jaxprm", "jaxprm.*", "configs"]),
    package_data={"jaxprm": ["assets/*"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "array-record>=0.7",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=1.0",
        "absl-py>=1.4",
        "ml-dtypes>=0.4",
        "transformers>=4.50",
        "jinja2>=3.1",  # chat templates (transformers' apply_chat_template needs it but does not require it)
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pillow>=10",
        "tqdm>=4.66",
        # OpenAI-compatible policy / judge client (jaxprm.search.openai_client); its request deadline hooks
        # into the httpcore2 transport of the httpx2-based openai releases
        "openai>=3.57",
        "httpcore2>=2.16",
        "pyarrow>=15",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        # MATH-V's official answer check compares expressions symbolically (jaxprm.data.answers)
        "sympy>=1.12",
        # the PRM scoring server (python -m jaxprm.serve)
        "fastapi>=0.110",
        "uvicorn>=0.29",
    ],
    extras_require={
        # torch is only the reference implementation for parity tests and benchmarks.
        "test": ["torch>=2.4", "pytest>=8", "scikit-learn", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
        # libtpu, the TPU compiler, for bench/pod_bench.py (and tests/test_pod_bench.py, skipped without it):
        # compiles for a TPU pod ahead of time on any machine. Not in "test": on a machine without a TPU,
        # libtpu prints warnings whenever JAX starts (CI installs it before the test command).
        "tpu-aot": ["jax[tpu]"],
    },
)
