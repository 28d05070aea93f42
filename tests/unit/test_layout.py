"""The layout of DESIGN.md: top-level folders exist and imports go one way, flows -> pipelines -> blip2."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "blip2": {"pipelines", "flows", "ray", "mlflow", "prefect", "img2dataset", "webdataset", "faiss"},
    "pipelines": {"flows", "prefect"},
    "flows": {"blip2", "torch"},  # thin wrappers over pipelines
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_top_level_layout():
    for name in ["pipelines", "blip2", "flows", "infra", "tests", "benchmarks", "prefect.yaml",
                 "pyproject.toml", "README.md", "Makefile", ".ci/run"]:
        assert (ROOT / name).exists(), f"{name} is part of the fixed top-level layout"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_roots(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "imports must go flows -> pipelines -> blip2:\n" + "\n".join(offenders)


def test_the_checker_sees_imports(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import ray.train\nfrom prefect import flow\nfrom . import sibling\n")
    assert imported_roots(sample) == {"ray", "prefect"}
