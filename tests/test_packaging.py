"""The wheel built from this repository installs and runs on its own."""

from __future__ import annotations

import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # builds a wheel and runs the demo in a new environment: about a minute
def test_wheel_installs_into_a_fresh_environment_and_runs(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("prunelab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "prunelab/py.typed" in names and "prunelab/models/weights/manifest.json" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    # A fresh environment that sees this one's dependencies (torch is GBs) but not prunelab.
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    where = "import site; print(site.getsitepackages()[0])"
    site_dir = Path(subprocess.run([str(python), "-c", where], capture_output=True, text=True,
                                   check=True).stdout.strip())
    deps = [p for p in site.getsitepackages() if "site-packages" in p]
    (site_dir / "deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site_dir), str(wheel)], check=True, timeout=300)
    out = tmp_path / "out"
    command = [str(python), "-m", "prunelab", "run", "-q", "--sparsity", "0.5", "--epochs", "2",
               "--finetune-epochs", "1", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    located = subprocess.run([str(python), "-c", "import prunelab; print(prunelab.__file__)"],
                             capture_output=True, text=True, check=True).stdout
    assert str(site_dir) in located  # the installed wheel, not the source tree
    assert list(out.glob("*/results.json"))
