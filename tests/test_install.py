"""First contact: what a fresh clone's commands meet before any training. Nothing at the repository
root stands in for an installed package (run from the root, `python -m` puts it first on sys.path),
opcod_kernels loads from an installed wheel with its C++ source, and start-up problems a user can
fix each get one line that says how."""
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"opcod", "opcod_kernels"}
# setup.py is the build script the design names: nothing imports it, and no installed package of
# ours or of our dependencies is called `setup`.
BUILD_SCRIPT = {"setup"}


def _python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    """`python -c` puts its working directory first on sys.path, as `python -m` and torchrun do."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, **env})


FIND_SPECS = """
import importlib.util, json, os, sys
out = {}
for entry in sorted(os.listdir(sys.argv[1] if len(sys.argv) > 1 else ".")):
    name = entry[:-3] if entry.endswith(".py") else entry
    if not name.isidentifier():
        continue
    spec = importlib.util.find_spec(name)
    out[name] = None if spec is None else [spec.origin, list(spec.submodule_search_locations or [])]
print(json.dumps(out))
"""


def test_nothing_at_the_root_is_importable_under_another_packages_name():
    """Every top-level file and folder of the checkout, looked up by import name from the root: none
    may resolve to a module or regular package inside the checkout, except ours. A folder without
    __init__.py (kernels/, tests/...) is at most a namespace portion, which Python takes only when no
    installed package has that name, so it never hides one."""
    res = _python(FIND_SPECS, ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    specs = json.loads(res.stdout)
    assert "kernels" in specs and "opcod" in specs
    venv = Path(sys.prefix).resolve()  # CI's venvs live inside the checkout

    def in_checkout(path):
        return path and Path(path).resolve().is_relative_to(ROOT) and not Path(path).resolve().is_relative_to(venv)
    shadows = {name: where[0] for name, where in specs.items()
               if where and in_checkout(where[0]) and name not in OURS | BUILD_SCRIPT}
    assert not shadows, f"importable from the root under another package's name: {shadows}"


def test_kernels_from_the_root_is_hugging_faces_package_or_nothing_of_ours():
    """transformers imports Hugging Face's `kernels` when `transformers.activations` loads; from the
    root that import used to find this repository's kernels/ folder (ImportError: CUDAProperties)."""
    outside = _python("import importlib.util; s = importlib.util.find_spec('kernels'); "
                      "print(s.origin if s else None)", ROOT.parent)
    inside = _python("""
        import importlib.util, sys
        import transformers.activations, opcod_kernels
        s = importlib.util.find_spec('kernels')
        print(s.origin if s else None)
        print(sorted(m for m in sys.modules if m.startswith('kernels')))
        try:
            import kernels.opcod_kernels
        except ImportError as e:
            print('refused:', e)
        """, ROOT)
    assert inside.returncode == 0, inside.stderr[-2000:]
    origin, loaded, *rest = inside.stdout.strip().splitlines()
    if outside.stdout.strip() != "None":  # Hugging Face's kernels is installed: the root finds it
        assert origin == outside.stdout.strip() and not Path(origin).resolve().is_relative_to(ROOT / "kernels")
    else:  # not installed: at most our namespace folder, and its package refuses a second import
        assert origin == "None"
        assert rest and rest[0].startswith("refused: import opcod_kernels, not kernels.opcod_kernels"), rest


def test_opcod_kernels_runs_from_an_installed_wheel_with_its_cpp_source(tmp_path):
    """`pip install ./kernels` builds a wheel that carries csrc/ inside opcod_kernels; installed
    alone, away from the checkout, it builds and runs its C++ CPU kernel and imports nothing of opcod."""
    wheels = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                          str(ROOT / "kernels")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (wheel,) = wheels.glob("opcod_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "opcod_kernels/csrc/jsd_rows.cpp" in names and not any(n.startswith("opcod/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run = _python("""
        import sys, torch, warnings
        warnings.simplefilter("error")        # a failed C++ build warns: make it fail the test
        import opcod_kernels as K
        from opcod_kernels import cpp_rows
        assert cpp_rows.available(), "C++ kernel did not build"
        g = torch.Generator().manual_seed(0)
        hs, ht, W = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(40, 8, generator=g)
        out = K.fused_linear_jsd(hs, ht, W, backend="cpp")
        ref = K.reference_fused_linear_jsd(hs.double(), ht.double(), W.double())
        assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item()), (out, ref)
        print(K.__file__)
        print(sorted(m for m in sys.modules if m == "opcod" or m.startswith("opcod.")))
        """, tmp_path, PYTHONPATH=str(site), OPCOD_CACHE=str(tmp_path / "cache"))
    assert run.returncode == 0, run.stderr[-2000:]
    where, opcod_modules = run.stdout.strip().splitlines()
    assert Path(where).is_relative_to(site) and opcod_modules == "[]"


def test_without_a_compiler_the_cpu_kernel_says_what_to_do_once(tmp_path):
    """No g++ on the machine: the loss still runs (the chunked PyTorch path) and one warning line
    names the fix."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    run = _python("""
        import torch, warnings
        import opcod_kernels as K
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(2):
                hs, ht, W = torch.randn(4, 8), torch.randn(4, 8), torch.randn(30, 8)
                K.fused_linear_jsd(hs, ht, W)
        for w in seen:
            if str(w.message).startswith("opcod_kernels"):
                print(str(w.message))
        """, tmp_path, PATH=str(bin_dir), CXX="", OPCOD_CACHE=str(tmp_path / "cache"))
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    assert "no C++ compiler" in lines[0] and "install g++" in lines[0] and "CXX" in lines[0], lines[0]


def test_a_cuda_torch_without_a_gpu_gets_one_line(monkeypatch, capsys):
    import torch

    from opcod import distributed
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    distributed.warn_cuda_torch_without_gpu()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA build" in err[0] and "no GPU" in err[0] and "pip install torch==" in err[0]
    monkeypatch.setattr(torch.version, "cuda", None)
    distributed.warn_cuda_torch_without_gpu()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("version,ok", [("0.32.0", True), ("0.32.1+cpu", True), ("0.31.2", False),
                                        ("0.33.0", False), ("0.10.1", False)])
def test_a_vllm_outside_the_supported_range_is_refused_with_the_range(version, ok):
    from opcod.engine_vllm import SUPPORTED_VLLM, check_vllm_version
    if ok:
        check_vllm_version(version)
    else:
        with pytest.raises(RuntimeError) as e:
            check_vllm_version(version)
        assert version in str(e.value) and SUPPORTED_VLLM in str(e.value) and "pip install" in str(e.value)
