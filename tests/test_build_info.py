"""What the native library was built for: the default CUDA targets embed PTX (so
GPUs newer than the list JIT the portable kernels instead of failing with "no
kernel image"), and the built library carries exactly the machine code and PTX
that its LRK_CUDA_ARCH_LIST asked for (read with cuobjdump)."""
import os
import shutil
import subprocess
import sys

import pytest

import lrk
from lrk import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _expected_device_code(arch_list):
    """PyTorch-style entries -> ({sm_XY}, {compute_XY}): every entry gives machine
    code, a "+PTX" entry PTX as well."""
    sass, ptx = set(), set()
    for arch in arch_list:
        num = arch.removesuffix("+PTX").replace(".", "")
        sass.add(f"sm_{num}")
        if arch.endswith("+PTX"):
            ptx.add(f"compute_{num}")
    return sass, ptx


def _cmake():
    found = shutil.which("cmake") or os.path.join(os.path.dirname(sys.executable), "cmake")
    return found if os.path.isfile(found) else None


def _parse_with_cmake(tmp_path, arch_list=None):
    """lrk_parse_arch_list of cmake/CudaArchitectures.cmake on arch_list (default: the
    tree's default list) -> (CUDA_ARCHITECTURES list, sm90a flag, the list parsed)."""
    cmake = _cmake()
    if cmake is None:
        pytest.skip("cmake not found")
    script = tmp_path / "parse.cmake"
    value = "${LRK_DEFAULT_CUDA_ARCH_LIST}" if arch_list is None else arch_list
    script.write_text(
        f'include("{ROOT}/cmake/CudaArchitectures.cmake")\n'
        f'set(_in "{value}")\n'
        'lrk_parse_arch_list("${_in}" _archs _sm90a)\n'
        'message(STATUS "archs=${_archs}|sm90a=${_sm90a}|in=${_in}")\n')
    out = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True, check=True)
    line = next(x for x in (out.stdout + out.stderr).splitlines() if "archs=" in x)
    archs, sm90a, given = line.split("archs=", 1)[1].split("|")
    return archs.split(";"), sm90a == "sm90a=ON", given.removeprefix("in=").split(";")


def test_default_arch_list_embeds_ptx_for_newer_gpus(tmp_path):
    archs, sm90a, default = _parse_with_cmake(tmp_path)
    # "80" is sm_80 machine code plus compute_80 PTX; "90a-real" machine code only.
    assert "80" in archs, f"default {default} -> {archs}: no compute_80 PTX, so sm_100/sm_120 GPUs cannot run lrk"
    assert "90a-real" in archs and sm90a, f"default {default} -> {archs}: no sm_90a machine code"


@pytest.mark.parametrize("given,archs,sm90a", [
    ("8.0;9.0a", ["80-real", "90a-real"], True),
    ("8.0+PTX;9.0a;10.0a;12.0", ["80", "90a-real", "100a-real", "120-real"], True),
    ("8.6+PTX", ["86"], False),
])
def test_arch_list_parsing(tmp_path, given, archs, sm90a):
    assert _parse_with_cmake(tmp_path, given)[:2] == (archs, sm90a)


def test_build_info_reports_the_build():
    info = lrk.build_info(device_code=False)
    assert info["library"] == _loader.library_path()
    assert info["cuda"] == lrk.has_cuda_kernels()
    if info["cuda"]:
        assert info["cuda_arch_list"], "a CUDA build must record its LRK_CUDA_ARCH_LIST"
        assert info["default_cuda_arch_list"] and info["nvcc"]
    else:
        assert info["cuda_arch_list"] == [] and info["sass"] is None and info["ptx"] is None


def test_embedded_device_code_reads_cuobjdump_listings(tmp_path):
    """The listing parser, on cuobjdump's output format (runs without CUDA)."""
    fake = tmp_path / "cuobjdump"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--list-elf" ]; then\n'
        "  echo 'ELF file    1: _C.cpython-311-x86_64-linux-gnu.1.sm_80.cubin'\n"
        "  echo 'ELF file    2: _C.cpython-311-x86_64-linux-gnu.2.sm_90a.cubin'\n"
        "  echo 'ELF file    3: _C.cpython-311-x86_64-linux-gnu.3.sm_80.cubin'\n"
        "else\n"
        "  echo 'PTX file    1: _C.cpython-311-x86_64-linux-gnu.1.sm_80.ptx'\n"
        "fi\n")
    fake.chmod(0o755)
    assert _loader.embedded_device_code("lib.so", str(fake)) == {"sass": ["sm_80", "sm_90a"], "ptx": ["compute_80"]}
    empty = tmp_path / "cuobjdump_empty"
    empty.write_text("#!/bin/sh\necho \"cuobjdump info    : File '$2' does not contain device code\" >&2\nexit 255\n")
    empty.chmod(0o755)
    assert _loader.embedded_device_code("lib.so", str(empty)) == {"sass": [], "ptx": []}


def test_library_carries_the_requested_device_code():
    info = lrk.build_info(device_code=False)
    if not info["cuda"]:
        pytest.skip("lrk built without CUDA kernels")
    cuobjdump = _loader.cuobjdump_path()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (PATH, CUDA_HOME, /usr/local/cuda, LRK_CUOBJDUMP)")
    code = _loader.embedded_device_code(info["library"], cuobjdump)
    sass, ptx = _expected_device_code(info["cuda_arch_list"])
    assert set(code["sass"]) == sass, f"LRK_CUDA_ARCH_LIST {info['cuda_arch_list']}: machine code {code['sass']}"
    assert set(code["ptx"]) == ptx, f"LRK_CUDA_ARCH_LIST {info['cuda_arch_list']}: PTX {code['ptx']}"
    if info["cuda_arch_list"] == info["default_cuda_arch_list"]:
        # The default build runs on Ampere and newer: sm_80 and sm_90a machine code,
        # compute_80 PTX for the GPUs after Hopper.
        assert {"sm_80", "sm_90a"} <= set(code["sass"]) and "compute_80" in code["ptx"], code
