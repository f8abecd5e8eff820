"""The seed's quick start, the CLI, and the set-up files agreeing with each other."""

import contextlib
import csv
import io
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from lqlib.cli import main

ROOT = Path(__file__).resolve().parents[1]

# The quick-start snippet of the founding document, with `core.e8_quantizer` replaced by `lqlib.e8`.
SEED_SNIPPET = '''\
from lqlib.e8 import encode_e8, compute_scale
import torch
x = torch.randn(1000, 8)
sigma2 = (x ** 2).mean().item()
scale = compute_scale(sigma2, bits=4.0)
q = encode_e8(x / scale)
x_hat = q * scale
mse = ((x - x_hat) ** 2).mean().item()
print(f"MSE gap: {mse / (sigma2 * 4**(-4)):.4f}") # Should be ~1.224
'''


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


def _requirement_names(specs):
    return {re.split(r"[<>=\[ ]", s, maxsplit=1)[0].lower() for s in specs}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_specs = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    extras = project["optional-dependencies"]
    wanted = set(project["dependencies"]) | {spec for group in extras.values() for spec in group
                                             if not spec.startswith("lqlib[")}
    # same packages; torch pinned to the CPU build that the README installs first
    assert _requirement_names(wanted) == _requirement_names(s for s in pip_specs if s != "-e .")
    assert set(pip_specs) - wanted == {"torch==2.13.0", "-e ."}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*$", readme, flags=re.M)
    assert commands[:2] == ["make book", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)


def test_no_library_code_imports_transformers_in_the_math_core():
    core = ["lattices", "theory", "rht", "symbols", "entropy_model", "rans", "steps", "wire", "codec", "e8", "errors",
            "allocation"]
    for name in core:
        source = (ROOT / "lqlib" / f"{name}.py").read_text()
        assert "transformers" not in re.sub(r'""".*?"""', "", source, flags=re.S), name
    probe = "import sys, lqlib; sys.exit('transformers' in sys.modules)"
    assert subprocess.run(["python", "-c", probe], cwd=ROOT).returncode == 0


def test_cli_evaluate(tmp_path, capsys):
    """The harness's command line on the default model: tidy CSV and JSON with every method."""
    import json

    assert main(["evaluate", "--bits", "4", "--window", "64", "--windows", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "evaluation.json").read_text())
    methods = {r["method"] for r in rows}
    assert {"full precision", "E8 + EC 4", "TurboQuant-style 4", "KIVI-4", "HF QuantizedCache quanto int4"} <= methods
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

