"""Installs `opcod` (the trainer) and `opcod_kernels` (the loss kernels, from kernels/)."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithCsrc(build_py):
    """Ship csrc/*.cpp inside opcod_kernels so a wheel install can JIT-build the CPU kernel."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "opcod_kernels" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for src in (ROOT / "csrc").glob("*.cpp"):
            shutil.copy2(src, dest / src.name)


setup(
    name="opcod",
    version="0.1.0",
    description="On-Policy Co-Distillation trainer with fused linear-JSD kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["opcod", "opcod_kernels"],
    package_dir={"opcod": "opcod", "opcod_kernels": "kernels"},
    package_data={"opcod": ["configs/*.yaml"]},
    cmdclass={"build_py": BuildPyWithCsrc},
    # torch is not pinned: an existing install (CPU 2.13.0 in CI, CUDA on clusters) is kept as is.
    install_requires=[
        "torch>=2.6",
        "triton>=3.3; platform_system == 'Linux'",
        "numpy",
        "transformers>=4.51",
        "safetensors",
        "tokenizers",
        "PyYAML",
        "tqdm",
        "matplotlib",
        "peft",          # model.lora and opcod.sft lora_rank: LoRA adapters
    ],
    extras_require={
        "trackers": ["tensorboard", "wandb", "trackio"],
        # the tests read back what each tracker wrote
        "test": ["pytest", "pytest-benchmark", "hypothesis", "tensorboard", "wandb", "trackio"],
        "gpu": ["vllm", "flash-attn"],
    },
)
