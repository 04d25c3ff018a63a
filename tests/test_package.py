"""DESIGN.md "Packaging": the import works anywhere, the public face is complete and
typed, and the command line starts without a traceback."""

from __future__ import annotations

import importlib.resources
import inspect
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import arbiter

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=60, check=False, env=env
    )


def test_import_needs_no_gpu_and_loads_no_nvml() -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    code = (
        "import sys, arbiter, arbiter.testing\n"
        "assert 'pynvml' not in sys.modules, 'pynvml imported at package import'\n"
        "print(arbiter.__version__)\n"
    )
    done = _run(sys.executable, "-c", code, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == arbiter.__version__
    assert done.stderr == ""


def test_every_name_in_all_exists_once() -> None:
    assert len(arbiter.__all__) == len(set(arbiter.__all__))
    missing = [name for name in arbiter.__all__ if not hasattr(arbiter, name)]
    assert missing == []
    assert isinstance(arbiter.__version__, str) and arbiter.__version__


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from arbiter import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(arbiter.__all__)


def test_public_classes_and_functions_have_docstrings() -> None:
    undocumented = [
        name
        for name in arbiter.__all__
        if (inspect.isclass(getattr(arbiter, name)) or inspect.isfunction(getattr(arbiter, name)))
        and not inspect.getdoc(getattr(arbiter, name))
    ]
    assert undocumented == []


def test_the_core_names_of_the_design_are_exported() -> None:
    for name in [
        "Arbiter",
        "ArbiterConfig",
        "Allocation",
        "ArbiterState",
        "ArbiterStats",
        "WorkloadType",
        "Priority",
        "MemoryPressure",
        "QualityPolicy",
        "KiB",
        "MiB",
        "GiB",
        "ArbiterError",
        "InsufficientMemory",
        "InsufficientQuality",
        "AllocationTimeout",
        "Preempted",
        "ShuttingDown",
        "IntegrityError",
        "FragmentUnavailable",
    ]:
        assert name in arbiter.__all__, name


def test_py_typed_is_in_the_package() -> None:
    marker = importlib.resources.files("arbiter").joinpath("py.typed")
    assert marker.is_file()


def test_py_typed_is_shipped_in_the_wheel(tmp_path: Path) -> None:
    wheel_builder = pytest.importorskip("hatchling.builders.wheel", reason="needs hatchling")
    builder = wheel_builder.WheelBuilder(str(REPO))
    [wheel] = list(builder.build(directory=str(tmp_path), versions=["standard"]))
    names = zipfile.ZipFile(wheel).namelist()
    assert "arbiter/py.typed" in names
    assert "arbiter/__init__.py" in names
    assert not [n for n in names if n.startswith("tests/")]


def test_the_mit_license_is_shipped_in_the_wheel(tmp_path: Path) -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "the gpu-arbiter authors" in text
    wheel_builder = pytest.importorskip("hatchling.builders.wheel", reason="needs hatchling")
    builder = wheel_builder.WheelBuilder(str(REPO))
    [wheel] = list(builder.build(directory=str(tmp_path), versions=["standard"]))
    with zipfile.ZipFile(wheel) as archive:
        [license_name] = [
            n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")
        ]
        assert archive.read(license_name).decode() == text
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        fields = archive.read(metadata).decode().splitlines()
    assert "License-Expression: MIT" in fields
    assert "License-File: LICENSE" in fields


def _assert_clean_exit(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode in (0, 2), done.stderr
    assert "Traceback" not in done.stderr
    assert "Traceback" not in done.stdout
    assert done.stdout.strip() or done.stderr.strip()  # it said something


def test_python_m_arbiter_help_exits_without_a_traceback() -> None:
    _assert_clean_exit(_run(sys.executable, "-m", "arbiter", "--help"))


def test_console_script_help_exits_without_a_traceback() -> None:
    script = shutil.which("arbiter", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the arbiter console script is not installed in this environment")
    _assert_clean_exit(_run(script, "--help"))
