"""The package as installed from a wheel: imported from site-packages (under
scripts/test.sh, LRK_TEST_INSTALLED=1), holding every module of the source tree
and no test artifacts, recording the torch it was built for, refusing another
torch release at import with a message that says how to rebuild; and the sdist
carrying every file the build reads."""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest
import torch

import lrk
from lrk import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_PACKAGE = os.path.join(ROOT, "python", "lrk")
PACKAGE = os.path.dirname(os.path.abspath(lrk.__file__))
INSTALLED_RUN = os.environ.get("LRK_TEST_INSTALLED") == "1"
installed_only = pytest.mark.skipif(not INSTALLED_RUN, reason="LRK_TEST_INSTALLED=1 (scripts/test.sh) tests the wheel")


def _site_dirs():
    paths = sysconfig.get_paths()
    return {os.path.realpath(paths["purelib"]), os.path.realpath(paths["platlib"])}


@installed_only
def test_lrk_is_imported_from_site_packages_not_the_tree():
    where = os.path.realpath(PACKAGE)
    assert os.path.dirname(where) in _site_dirs(), f"lrk imported from {where}, not from {_site_dirs()}"
    assert not where.startswith(os.path.realpath(SOURCE_PACKAGE)), "lrk imported from the source tree"


@installed_only
def test_wheel_holds_every_module_of_the_tree():
    if not os.path.isdir(SOURCE_PACKAGE):
        pytest.skip("no source tree beside the tests")
    missing = []
    for dirpath, _, files in os.walk(SOURCE_PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), SOURCE_PACKAGE)
                if not os.path.isfile(os.path.join(PACKAGE, rel)):
                    missing.append(rel)
    assert not missing, f"in python/lrk but not in the installed package: {missing}"


@installed_only
def test_installed_package_has_no_test_artifacts_and_matching_metadata():
    names = os.listdir(PACKAGE)
    assert [n for n in names if n.startswith("_C") and n.endswith(".so") and not n.startswith("_C_emu")]
    assert not [n for n in names if n.startswith("_C_emu") or n.endswith(".torch-version")], names
    assert importlib.metadata.version("lrk") == lrk.__version__


def test_build_record_names_this_torch_and_the_version_tag():
    config = _loader.build_config()
    if not config:
        pytest.skip("library built without setup.py: no build record")
    info = lrk.build_info(device_code=False)
    release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert info["torch"] == config["torch"]
    assert info["torch"].split("+")[0].split(".")[:2] == release.split(".")
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if info["cuda"] else "cpu"
    assert info["version"] == f"{lrk._version.__version__}+{flavour}torch{release}" == lrk.__version__
    assert config["cuda"] == info["cuda"]


@pytest.mark.parametrize("built,running,running_cuda,ok", [
    ({"torch": "2.14.1+cu130", "cuda": True, "torch_cuda": "13.0"}, "2.14.0+cu130", "13.0", True),
    ({"torch": "2.14.1+cu130", "cuda": True, "torch_cuda": "13.0"}, "2.14.1+cu129", "12.9", False),
    ({"torch": "2.14.1+cu130", "cuda": True, "torch_cuda": "13.0"}, "2.14.1+cpu", None, False),
    ({"torch": "2.14.1+cu130", "cuda": True, "torch_cuda": "13.0"}, "2.13.0+cu130", "13.0", False),
    ({"torch": "2.13.0+cpu", "cuda": False, "torch_cuda": None}, "2.13.1+cu130", "13.0", True),
    ({"torch": "2.13.0+cpu", "cuda": False, "torch_cuda": None}, "2.14.1+cpu", None, False),
    ({"torch": "2.13.0", "cuda": False, "torch_cuda": None}, "2.1.3", None, False),
    ({}, "2.14.1", None, True),
])
def test_torch_mismatch_rules(built, running, running_cuda, ok):
    problem = _loader.torch_mismatch(dict(built, version="0.1.0+x"), running, running_cuda)
    if ok:
        assert problem is None
    else:
        assert built["torch"] in problem and running in problem and "--no-build-isolation" in problem


def test_import_under_another_torch_fails_with_both_versions(tmp_path):
    """A copy of the installed package whose record names torch 2.1.0: importing it
    stops before the library loads, naming both versions and the rebuild command."""
    if not _loader.build_config():
        pytest.skip("library built without setup.py: no build record")
    copy = tmp_path / "lrk"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in os.listdir(PACKAGE):
        if name.endswith(".so") and not name.startswith("_C_emu"):
            os.symlink(os.path.join(PACKAGE, name), copy / name)
    record = json.loads((copy / "_build.json").read_text())
    record["torch"] = "2.1.0+fake"
    (copy / "_build.json").write_text(json.dumps(record))
    run = subprocess.run([sys.executable, "-c", "import lrk"], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert run.returncode != 0
    assert "ImportError" in run.stderr and "2.1.0+fake" in run.stderr and torch.__version__ in run.stderr, run.stderr
    assert "pip install --no-build-isolation" in run.stderr and "undefined symbol" not in run.stderr


def test_sdist_carries_every_build_input(tmp_path):
    """The sdist (setuptools' PEP 517 backend, as `python -m build --sdist` calls it)
    holds every tracked file under csrc/, cmake/ and python/, and the build files."""
    if not os.path.isfile(os.path.join(ROOT, "setup.py")) or shutil.which("git") is None:
        pytest.skip("needs the source tree and git")
    listed = subprocess.run(["git", "ls-files", "csrc", "cmake", "python", "CMakeLists.txt", "LICENSE",
                             "setup.py", "pyproject.toml", "README.md"],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("the source tree is not a git checkout")
    tracked = set(listed.stdout.split())
    run = subprocess.run([sys.executable, "-c",
                          "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    name = run.stdout.strip().splitlines()[-1]
    assert name == f"lrk-{lrk._version.__version__}.tar.gz", name   # an sdist is for every torch
    with tarfile.open(tmp_path / name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    missing = sorted(tracked - members)
    assert not missing, f"tracked build inputs missing from the sdist: {missing}"
    assert not [m for m in members if m.endswith(".so") or m.endswith(".torch-version")], "built files in the sdist"


def test_emulated_libraries_are_looked_up_outside_the_package(monkeypatch, tmp_path):
    """The emulated libraries (test artifacts) come from LRK_EMU_LIBRARY_DIR when set,
    else from the package folder; and only with a stamp naming this torch."""
    import sysconfig

    import lrk.emulated as emulated

    monkeypatch.delenv("LRK_EMU_LIBRARY_DIR", raising=False)
    assert emulated.library_dir() == __import__("pathlib").Path(PACKAGE).resolve()
    monkeypatch.setenv("LRK_EMU_LIBRARY_DIR", str(tmp_path))
    name = "_C_emu" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
    assert emulated.library_path() == tmp_path / name
    assert not emulated.available()
    (tmp_path / name).write_bytes(b"")
    (tmp_path / "_C_emu.torch-version").write_text("0.0.1\n")
    assert not emulated.available()          # built for another torch
    (tmp_path / "_C_emu.torch-version").write_text(torch.__version__ + "\n")
    assert emulated.available()
