from setuptools import setup

setup(
    name="upernet_fast",
    version="0.1.0",
    description="Fast drop-in UPerNet semantic segmentation (Hugging Face checkpoint compatible)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["upernet_fast", "upernet_fast.backbones", "upernet_fast.kernels"],
    package_data={"upernet_fast": ["assets/*", "assets/*/*"], "upernet_fast.kernels": ["csrc/*.c"]},
    include_package_data=True,
    install_requires=["torch>=2.4", "triton", "numpy", "safetensors", "pillow", "tqdm"],
    extras_require={
        "test": ["transformers>=5", "pytest", "pytest-benchmark", "huggingface_hub", "ruff==0.17.6"],
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
    },
    entry_points={"console_scripts": ["upernet-fast=upernet_fast.cli:main"]},
)
