# Locates the installed PyTorch by asking the Python interpreter that runs the
# build, so the extension is always compiled against the torch it will load into.
# Sets:
#   LRK_TORCH_VERSION, LRK_TORCH_INCLUDE_DIRS, LRK_TORCH_LIBRARY_DIR,
#   LRK_TORCH_CXX11_ABI (0/1), LRK_TORCH_HAS_CUDA (ON/OFF), LRK_TORCH_CUDA_VERSION,
#   LRK_TORCH_EXTRA_CUDA_INCLUDE_DIRS (cuBLAS & co. headers shipped in nvidia-* wheels)

if(NOT Python3_EXECUTABLE)
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
endif()

set(_lrk_probe [=[
import glob, os, sys
try:
    import torch
    from torch.utils import cpp_extension
except Exception as exc:  # report, CMake turns it into a clear error
    print("ERROR;" + repr(exc)); sys.exit(0)
site = os.path.dirname(os.path.dirname(torch.__file__))
extra = sorted(set(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
                   | set(glob.glob(os.path.join(site, "nvidia", "*", "include"))))
print(";".join([
    "OK",
    torch.__version__,
    "|".join(cpp_extension.include_paths()),
    os.path.join(os.path.dirname(torch.__file__), "lib"),
    str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
    "ON" if torch.version.cuda else "OFF",
    torch.version.cuda or "",
    "|".join(extra),
]))
]=])

execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c "${_lrk_probe}"
  OUTPUT_VARIABLE _lrk_out OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _lrk_rc)
list(GET _lrk_out 0 _lrk_status)
if(NOT _lrk_rc EQUAL 0 OR NOT _lrk_status STREQUAL "OK")
  message(FATAL_ERROR
    "lrk builds against the installed PyTorch, but '${Python3_EXECUTABLE}' "
    "could not import torch (${_lrk_out}). Install torch first and build with "
    "'pip install --no-build-isolation .'")
endif()
list(GET _lrk_out 1 LRK_TORCH_VERSION)
list(GET _lrk_out 2 _incs)
list(GET _lrk_out 3 LRK_TORCH_LIBRARY_DIR)
list(GET _lrk_out 4 LRK_TORCH_CXX11_ABI)
list(GET _lrk_out 5 LRK_TORCH_HAS_CUDA)
list(GET _lrk_out 6 LRK_TORCH_CUDA_VERSION)
list(GET _lrk_out 7 _extra)
string(REPLACE "|" ";" LRK_TORCH_INCLUDE_DIRS "${_incs}")
string(REPLACE "|" ";" LRK_TORCH_EXTRA_CUDA_INCLUDE_DIRS "${_extra}")
message(STATUS "lrk: torch ${LRK_TORCH_VERSION} (CUDA: ${LRK_TORCH_HAS_CUDA} ${LRK_TORCH_CUDA_VERSION}) at ${LRK_TORCH_LIBRARY_DIR}")
