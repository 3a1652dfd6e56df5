"""The installed package carries every file the code reads at run time (the images install with
`pip install .`, not from a checkout): the CUDA sources under neuron/kernels/ above all."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


PACKAGES = ("cortex", "neuron", "common")


def test_the_wheel_holds_every_non_python_file_of_the_packages(tmp_path):
    # built from a copy: setuptools would reuse a build/ folder of the checkout
    source = tmp_path / "source"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(source)], check=True, timeout=120)
    wheel, = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {path.relative_to(ROOT).as_posix()
              for package in PACKAGES for path in (ROOT / package).rglob("*")
              if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".py", ".pyc")}
    assert any(name.endswith(".cu") for name in wanted)
    assert sorted(wanted - names) == []
