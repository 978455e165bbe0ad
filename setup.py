"""fastjac: plain `pip install .`; needs no GPU and no compiler.

The C++ CPU kernels in csrc/ are compiled just in time against the installed torch (fastjac/backends/cpp.py, or
ahead of time by `python -m fastjac build`), never here: a missing compiler cannot make the install fail. A
non-editable install ships the sources as fastjac/_csrc/ (build_py below); an editable one reads csrc/ in place.
"""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CSRC_FILES = ("register.cpp", "attn_jvp.cpp", "flash_attn.cpp", "norm_jvp.cpp", "step_dense.cpp", "common.h")


class build_py_with_csrc(build_py):
    """Copy csrc/ into the built package as fastjac/_csrc/, where the JIT build looks for it."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        here = os.path.dirname(os.path.abspath(__file__))
        dst = os.path.join(self.build_lib, "fastjac", "_csrc")
        os.makedirs(dst, exist_ok=True)
        for f in CSRC_FILES:
            src = os.path.join(here, "csrc", f)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(dst, f))


setup(
    name="fastjac",
    version="0.3.0",
    description="Exact, fast Jacobians of recurrent self-attention and a dynamical-systems toolkit on them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fastjac", "fastjac.*"]),
    package_data={"fastjac": ["ops/*/README.md", "train/weights/*.safetensors"]},  # the shipped trained model
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "safetensors>=0.4",  # model files: weights + JSON config, loaded without unpickling
        # Triton ships wheels for Linux on x86_64 and aarch64 only; elsewhere fastjac runs without it.
        "triton>=3.0; sys_platform == 'linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
    ],
    cmdclass={"build_py": build_py_with_csrc},
    extras_require={
        # ninja: the tests build the C++ extension (backend="cpp") just in time; transformers: the third-party
        # layers of tests/test_own_models.py (the "thirdparty" extra), which CI must run
        "test": [
            "ninja",
            "pytest>=7",
            "hypothesis>=6",
            "pytest-benchmark",
            "matplotlib>=3.5",
            "transformers>=4.48",
            "mpmath",
            "ruff==0.17.5",
        ],
        "thirdparty": ["transformers>=4.48"],  # fastjac.integrations.transformers, HF layers as steps
        "plot": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["fastjac=fastjac.__main__:main"]},
)
