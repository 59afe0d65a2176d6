"""Loads lrk's native library, which registers every torch.ops.lrk kernel."""
from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import shutil
import subprocess

import torch

_LOADED: str | None = None


def library_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not candidates:
        raise ImportError(
            f"lrk's native library (_C*.so) is missing from {here}: build it with "
            "'pip install --no-build-isolation .' (or -e . for a development install)")
    return candidates[0]


def build_config(directory: str | None = None) -> dict:
    """What setup.py recorded next to the library (``_build.json``): the package
    version, the torch (and its CUDA) it was compiled against; {} when absent (a
    library built by hand with CMake)."""
    directory = directory or os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(directory, "_build.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _release(version: str) -> tuple[str, ...]:
    """'2.14.1+cu130' -> ('2', '14'): torch's C++ ABI is kept within a release line."""
    return tuple(version.split("+", 1)[0].split(".")[:2])


def torch_mismatch(config: dict, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why a library built as `config` says cannot load into this torch, or None.
    A library for another torch release fails with undefined symbols (C++ ABI); one
    with CUDA kernels needs a CUDA torch of the same CUDA major version."""
    built = config.get("torch")
    if not built:
        return None
    problem = None
    if _release(built) != _release(torch_version):
        problem = f"torch {built}, but torch {torch_version} is installed"
    elif config.get("cuda") and not torch_cuda:
        problem = f"torch {built} with CUDA {config.get('torch_cuda')}, but the installed torch {torch_version} has no CUDA"
    elif config.get("cuda") and (config.get("torch_cuda") or "").split(".")[0] != torch_cuda.split(".")[0]:
        problem = (f"torch {built} with CUDA {config.get('torch_cuda')}, but the installed torch "
                   f"{torch_version} uses CUDA {torch_cuda}")
    if problem is None:
        return None
    return (f"lrk {config.get('version', '')} was built for {problem}. Install the lrk wheel built for "
            f"this torch (its version ends in +...torch{'.'.join(_release(torch_version))}) or rebuild lrk "
            "against it from the source tree or sdist: pip install --no-build-isolation --no-deps "
            "--force-reinstall <lrk source folder or lrk-*.tar.gz> (scripts/build_wheel.sh builds a wheel)")


def load() -> str:
    global _LOADED
    if _LOADED is None:
        path = library_path()
        problem = torch_mismatch(build_config(os.path.dirname(path)), torch.__version__, torch.version.cuda)
        if problem:
            raise ImportError(problem)
        torch.ops.load_library(path)
        _LOADED = path
    return _LOADED


def has_cuda_kernels() -> bool:
    """True when the library was built with CUDA kernels."""
    load()
    return torch._C._dispatch_has_kernel_for_dispatch_key("lrk::lora_fused_fwd", "CUDA")


def _c_string(lib: ctypes.CDLL, name: str) -> str:
    fn = getattr(lib, name, None)
    if fn is None:  # a library older than build_info.cpp
        return ""
    fn.restype = ctypes.c_char_p
    return fn().decode()


def _split_archs(text: str) -> list[str]:
    return [a for a in re.split(r"[,; ]+", text) if a]


def cuobjdump_path() -> str | None:
    """cuobjdump from $LRK_CUOBJDUMP, the PATH, CUDA_HOME, /usr/local/cuda or the
    copy that triton's wheel carries; None when there is none."""
    candidates = [os.environ.get("LRK_CUOBJDUMP"), shutil.which("cuobjdump")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "cuobjdump"))
    try:
        import importlib.util
        spec = importlib.util.find_spec("triton")  # located, not imported
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                candidates.append(os.path.join(loc, "backends", "nvidia", "bin", "cuobjdump"))
    except (ImportError, ValueError):
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def embedded_device_code(path: str | None = None, cuobjdump: str | None = None) -> dict | None:
    """{"sass": ["sm_80", "sm_90a"], "ptx": ["compute_80"]}: the machine code and PTX
    targets in the library's fat binaries, read with cuobjdump; None without cuobjdump."""
    path = path or library_path()
    cuobjdump = cuobjdump or cuobjdump_path()
    if cuobjdump is None:
        return None
    found = {}
    for kind, flag, pattern in (("sass", "--list-elf", r"\.(sm_\w+?)\.cubin"),
                                ("ptx", "--list-ptx", r"\.(sm_\w+?|compute_\w+?)\.ptx")):
        run = subprocess.run([cuobjdump, flag, path], capture_output=True, text=True)
        # cuobjdump fails on a file without device code (a CPU-only library): nothing embedded.
        names = set(re.findall(pattern, run.stdout)) if run.returncode == 0 else set()
        if kind == "ptx":  # cuobjdump names a PTX file after the virtual arch as sm_XX
            names = {n.replace("sm_", "compute_", 1) for n in names}
        found[kind] = sorted(names)
    return found


def build_info(device_code: bool = True) -> dict:
    """What the loaded native library was built for:

    - ``library``: its path; ``cuda``: whether it has CUDA kernels;
    - ``version``: the package version with its local tag (``0.1.0+cu130torch2.14``)
      and ``torch``: the torch it was compiled against (None for a library built
      without setup.py); importing lrk under another torch release fails;
    - ``cuda_arch_list``: ``LRK_CUDA_ARCH_LIST`` as built (``["8.0+PTX", "9.0a"]``;
      empty for a CPU-only library) and ``default_cuda_arch_list``, the source
      tree's default; ``nvcc``: the compiler version;
    - ``sass`` / ``ptx``: the targets found in the library by cuobjdump
      (``device_code=True`` and cuobjdump found, else None). A GPU runs the
      library when its ``sm_XY`` is in ``sass`` or a ``compute_XY`` <= its own
      is in ``ptx`` (JIT-compiled at first load)."""
    path = load()
    lib = ctypes.CDLL(path)  # the already loaded library: same handle
    config = build_config(os.path.dirname(path))
    info = {
        "library": path,
        "version": config.get("version"),
        "torch": config.get("torch"),
        "cuda": has_cuda_kernels(),
        "cuda_arch_list": _split_archs(_c_string(lib, "lrk_build_cuda_arch_list")),
        "default_cuda_arch_list": _split_archs(_c_string(lib, "lrk_build_default_cuda_arch_list")),
        "nvcc": _c_string(lib, "lrk_build_nvcc_version"),
        "sass": None,
        "ptx": None,
    }
    if device_code and info["cuda"]:
        code = embedded_device_code(path)
        if code is not None:
            info.update(code)
    return info
