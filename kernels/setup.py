"""Build step of opcod-kernels: ship the C++ row kernel (the repository's top-level csrc/) inside the
package, so an installed wheel can JIT-build its CPU kernel. Metadata lives in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "csrc"  # absent when building from an sdist, which carries its own copy


def copy_sources(dest: Path) -> None:
    if not CSRC.is_dir():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for src in CSRC.glob("*.cpp"):
        shutil.copy2(src, dest / src.name)


class BuildPy(build_py):
    def run(self):
        super().run()
        copy_sources(Path(self.build_lib) / "opcod_kernels" / "csrc")


class Sdist(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        copy_sources(Path(base_dir) / "opcod_kernels" / "csrc")


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
