"""Builds lrk's native library with CMake (see CMakeLists.txt).

    pip install --no-build-isolation .        # or -e . / pip wheel --no-build-isolation .
    bash scripts/build_wheel.sh               # the wheel (and --sdist) for the installed torch

A wheel is built for one torch release and one CUDA version; its version carries
both as a local tag: 0.1.0+cu130torch2.14 (CUDA kernels), 0.1.0+cputorch2.13
(CPU-only). The sdist is plain 0.1.0 and builds the same way from source.

Build variables (environment):
    LRK_BUILD_CUDA      AUTO (default) | ON | OFF
    LRK_CUDA_ARCH_LIST  default "8.0+PTX;9.0a" (sm_80 and sm_90a machine code, compute_80
                        PTX that newer GPUs JIT); e.g. "9.0a" or "8.0+PTX;9.0a;10.0a;12.0"
    CUTLASS_DIR         CUTLASS checkout (else the nvidia-cutlass wheel's headers)
    MAX_JOBS            parallel compile jobs (default: all cores)
    LRK_BUILD_TYPE      Release (default) | RelWithDebInfo | Debug
    LRK_CMAKE           the cmake to use (default: the newest one >= MIN_CMAKE among the
                        pip `cmake` package next to this python, and the PATH)
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BASE_VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "python/lrk/_version.py").read_text()).group(1)
# CMake 3.25.2 is the first to know nvcc's C++20 flag (CUDA_STANDARD 20); 3.25.1
# and older stop at the CUDA compiler check. Keep in step with CMakeLists.txt and
# pyproject.toml.
MIN_CMAKE = (3, 25, 2)
# Test artifacts that a source-tree build may leave in python/lrk: never packaged.
NOT_PACKAGED = ["_C_emu*", "*.torch-version", "_build.json"]


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError(
            "lrk compiles against the installed torch. Install torch first, then "
            "build without isolation: pip install --no-build-isolation .") from exc
    return torch


def _find_nvcc() -> str | None:
    # CMakeLists.txt's order: CUDACXX, then the toolkit folder before the PATH.
    for cand in (os.environ.get("CUDACXX"),
                 os.path.join(os.environ.get("CUDA_HOME", "") or "/nonexistent", "bin", "nvcc"),
                 "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def build_plan() -> dict:
    """What this build makes, decided once (CMake gets an explicit ON/OFF) so that the
    wheel's version tag and the recorded build configuration match the library."""
    torch = _torch()
    mode = os.environ.get("LRK_BUILD_CUDA", "AUTO").upper()
    if mode not in ("AUTO", "ON", "OFF"):
        raise RuntimeError(f"LRK_BUILD_CUDA: expected AUTO, ON or OFF, got {mode!r}")
    nvcc = _find_nvcc() if mode != "OFF" else None
    cuda = mode != "OFF" and bool(torch.version.cuda) and nvcc is not None
    if mode == "ON" and not cuda:
        raise RuntimeError(f"LRK_BUILD_CUDA=ON but torch {torch.__version__} has CUDA={torch.version.cuda} "
                           f"and nvcc={nvcc}")
    release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if cuda else "cpu"
    return {
        "version": f"{BASE_VERSION}+{flavour}torch{release}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda if cuda else None,
        "cuda": cuda,
        "nvcc": nvcc,
    }


def _cmake_version(cmake: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(g) for g in m.groups()) if m else None


def find_cmake() -> str:
    """LRK_CMAKE, else the first CMake >= MIN_CMAKE among the pip `cmake` package
    installed for this python and the PATH; stops with the version needed otherwise."""
    if os.environ.get("LRK_CMAKE"):
        candidates = [os.environ["LRK_CMAKE"]]
    else:
        candidates = []
        try:
            import cmake as cmake_pkg  # the pip package: its binary, not its entry-point script
            candidates.append(os.path.join(cmake_pkg.CMAKE_BIN_DIR, "cmake"))
        except (ImportError, AttributeError):
            pass
        candidates += [os.path.join(os.path.dirname(sys.executable), "cmake"), shutil.which("cmake")]
    seen = []
    for cand in candidates:
        if not cand or not os.path.isfile(cand):
            continue
        version = _cmake_version(cand)
        seen.append(f"{cand} ({'.'.join(map(str, version)) if version else 'unknown version'})")
        if version and version >= MIN_CMAKE:
            return cand
    need = ".".join(map(str, MIN_CMAKE))
    raise RuntimeError(
        f"lrk needs CMake >= {need} (the first that builds C++20 CUDA sources with nvcc); found: "
        f"{', '.join(seen) or 'none'}. Install it with: pip install 'cmake>={need}' "
        "(or point LRK_CMAKE at one)")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def _cmake_dir(self, plan: dict) -> Path:
        """One build folder per configuration (python, torch, CUDA or not): rebuilding the
        same configuration reuses CMake's objects and ccache's entries, and a CPU-only
        build against another torch never picks up a cached CUDA configuration.
        An explicit --build-temp is used as given."""
        temp = Path(self.build_temp)
        if not temp.name.startswith("temp."):   # setuptools' default name: temp.<platform>-<python>
            return temp.resolve() / "cmake"
        flavour = plan["version"].split("+", 1)[1]
        return ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}-{flavour}-{plan['torch']}"

    def build_extension(self, ext: CMakeExtension) -> None:
        plan = build_plan()
        cmake = find_cmake()
        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_file.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        name, suffix = out_file.name.split(".", 1)
        build_dir = self._cmake_dir(plan)
        build_dir.mkdir(parents=True, exist_ok=True)

        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('LRK_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DLRK_OUTPUT_NAME={name}",
            f"-DLRK_OUTPUT_SUFFIX=.{suffix}",
            f"-DLRK_BUILD_CUDA={'ON' if plan['cuda'] else 'OFF'}",
        ]
        if plan["cuda"]:
            args.append(f"-DCMAKE_CUDA_COMPILER={plan['nvcc']}")
        ninja = shutil.which("ninja") or shutil.which("ninja", path=os.path.dirname(sys.executable))
        if ninja:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        if os.environ.get("CUTLASS_DIR"):
            args.append(f"-DCUTLASS_DIR={os.environ['CUTLASS_DIR']}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        print(f"lrk: building {plan['version']} with {cmake} in {build_dir}", flush=True)
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
        # Read by lrk._loader before it loads the library: a torch other than this
        # one gets a clear error instead of undefined symbols.
        record = {k: plan[k] for k in ("version", "torch", "torch_cuda", "cuda")}
        record["cuda_arch_list"] = (os.environ.get("LRK_CUDA_ARCH_LIST") or None) if plan["cuda"] else None
        (out_dir / "_build.json").write_text(json.dumps(record, indent=1) + "\n")


def _version() -> str:
    # An sdist is for every torch: the plain version. A wheel names its torch and CUDA.
    if any(cmd in sys.argv for cmd in ("sdist", "egg_info")) and "bdist_wheel" not in sys.argv:
        return BASE_VERSION
    return build_plan()["version"]


setup(
    version=_version(),
    packages=find_packages("python"),
    package_dir={"": "python"},
    exclude_package_data={"lrk": NOT_PACKAGED},
    ext_modules=[CMakeExtension("lrk._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
