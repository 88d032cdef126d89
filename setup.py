"""rct-dist: distributed embedding transfer with the relaxed contrastive loss.

torch is required but not pinned to a build: install the torch (and torchvision) build for your
hardware first (CUDA, ROCm or CPU); any torch >= 2.4 is accepted.
"""

from setuptools import find_packages, setup

setup(
    name="rct-dist",
    version="0.1.0",
    description="Distributed embedding transfer (relaxed contrastive loss) on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["rct_dist", "rct_dist.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.14",
        "timm>=1.0",
        "webdataset>=0.2.86",
        "accelerate>=0.30",
        "tensorboard>=2.14",
        "pyyaml>=6",
        "numpy",
        "scikit-learn>=1.3",
        "safetensors>=0.4",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["rct-dist=rct_dist.cli:main"]},
)
