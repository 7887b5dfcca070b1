"""The package as a user installs it: a wheel that holds its configs and assets and runs from any
folder, without the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from delvm.configs import shipped_configs

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "delvm"

pytestmark = pytest.mark.slow  # builds and installs a wheel (~20 s)


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def package_data() -> set[str]:
    """Every file of the package that is not Python code: what the wheel must carry beside it."""
    return {
        p.relative_to(PACKAGE.parent).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy, so the build's scratch folders (build/, *.egg-info) stay out of the checkout.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / "src" / "delvm", ignore=shutil.ignore_patterns("__pycache__"))
    dist = source / "dist"
    pip_wheel = ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist)]
    run([sys.executable, "-m", "pip", *pip_wheel, str(source)], cwd=source)
    (built,) = dist.glob("delvm-*.whl")
    return built


def test_wheel_carries_the_configs_assets_and_license(wheel):
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    data = package_data()
    assert {"delvm/configs/demo.toml", "delvm/configs/data/toyworld.toml"} <= data
    assert any(name.startswith("delvm/data/assets/") for name in data)
    assert data <= names, sorted(data - names)
    license_text = archive.read("delvm-0.1.0.dist-info/licenses/LICENSE").decode()
    assert license_text == (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in license_text
    metadata = archive.read("delvm-0.1.0.dist-info/METADATA").decode().splitlines()
    assert {"License-Expression: Apache-2.0", "Requires-Dist: torch>=2.6"} <= set(metadata)


def test_installed_wheel_runs_from_an_empty_folder(wheel, tmp_path):
    target, empty = tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    # --no-deps: the dependencies (torch among them) are the ones this interpreter already has.
    pip_install = ["install", "--no-deps", "--no-index", "-q", "--target", str(target)]
    run([sys.executable, "-m", "pip", *pip_install, str(wheel)], cwd=tmp_path)
    # Only the installed copy on the path: the checkout's src/ must not be what runs.
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    listed = run([sys.executable, "-m", "delvm.cli", "configs"], cwd=empty, env=env)
    assert listed.split() == shipped_configs()
    script = (
        "import delvm\n"
        "from delvm.cli import main\n"
        "from delvm.demo.pipeline import load_demo_config\n"
        "print(delvm.__file__)\n"
        "print(load_demo_config('demo').out)\n"  # what `delvm demo` reads before it runs
        "assert main(['configs', 'tiny', '--copy-to', '.']) == 0\n"
    )
    printed = run([sys.executable, "-c", script], cwd=empty, env=env).splitlines()
    assert Path(printed[0]).is_relative_to(target), printed[0]
    assert printed[1] == "demo_out"
    assert [p.name for p in empty.iterdir()] == ["tiny.toml"]
    assert (empty / "tiny.toml").read_text() == (PACKAGE / "configs" / "tiny.toml").read_text()
