"""fastjac: plain `pip install .`; needs no GPU and no compiler (a compiled CUDA extension in csrc/ is future work)."""
from setuptools import find_packages, setup

setup(
    name="fastjac",
    version="0.1.0",
    description="Exact, fast Jacobians of recurrent self-attention and a dynamical-systems toolkit on them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fastjac", "fastjac.*"]),
    package_data={"fastjac": ["ops/*/README.md"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "safetensors>=0.4",  # model files: weights + JSON config, loaded without unpickling
        # Triton ships wheels for Linux on x86_64 and aarch64 only; elsewhere fastjac runs without it.
        "triton>=3.0; sys_platform == 'linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark", "matplotlib>=3.5"],
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["fastjac=fastjac.__main__:main"]},
)
