"""Builds lrk's native library with CMake (see CMakeLists.txt).

    pip install --no-build-isolation .        # or -e . / pip wheel --no-build-isolation .

Build variables (environment):
    LRK_BUILD_CUDA      AUTO (default) | ON | OFF
    LRK_CUDA_ARCH_LIST  default "8.0+PTX;9.0a" (sm_80 and sm_90a machine code, compute_80
                        PTX that newer GPUs JIT); e.g. "9.0a" or "8.0+PTX;9.0a;10.0a;12.0"
    CUTLASS_DIR         CUTLASS checkout (else the nvidia-cutlass wheel's headers)
    MAX_JOBS            parallel compile jobs (default: all cores)
    LRK_BUILD_TYPE      Release (default) | RelWithDebInfo | Debug
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "lrk compiles against the installed torch. Install torch first, then "
                "build without isolation: pip install --no-build-isolation .") from exc
        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_file.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        name, suffix = out_file.name.split(".", 1)
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)

        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('LRK_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DLRK_OUTPUT_NAME={name}",
            f"-DLRK_OUTPUT_SUFFIX=.{suffix}",
            f"-DLRK_BUILD_CUDA={os.environ.get('LRK_BUILD_CUDA', 'AUTO')}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        if os.environ.get("CUTLASS_DIR"):
            args.append(f"-DCUTLASS_DIR={os.environ['CUTLASS_DIR']}")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[CMakeExtension("lrk._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
