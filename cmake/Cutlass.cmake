# Finds CUTLASS/CuTe headers: a directory named by CUTLASS_DIR (env or cache,
# either a CUTLASS checkout or its include/ folder), else the headers shipped in
# the PyPI wheel nvidia-cutlass (package cutlass_library). Sets LRK_CUTLASS_INCLUDE_DIRS.
set(LRK_CUTLASS_INCLUDE_DIRS "")
set(_lrk_cutlass_root "${CUTLASS_DIR}")
if(NOT _lrk_cutlass_root AND DEFINED ENV{CUTLASS_DIR})
  set(_lrk_cutlass_root "$ENV{CUTLASS_DIR}")
endif()
if(_lrk_cutlass_root)
  foreach(_cand "${_lrk_cutlass_root}/include" "${_lrk_cutlass_root}")
    if(EXISTS "${_cand}/cutlass/cutlass.h")
      list(APPEND LRK_CUTLASS_INCLUDE_DIRS "${_cand}")
      break()
    endif()
  endforeach()
  if(EXISTS "${_lrk_cutlass_root}/tools/util/include")
    list(APPEND LRK_CUTLASS_INCLUDE_DIRS "${_lrk_cutlass_root}/tools/util/include")
  endif()
  if(NOT LRK_CUTLASS_INCLUDE_DIRS)
    message(FATAL_ERROR "CUTLASS_DIR='${_lrk_cutlass_root}' holds no cutlass/cutlass.h")
  endif()
else()
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
      "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))"
    OUTPUT_VARIABLE _lrk_wheel_src OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _lrk_rc ERROR_QUIET)
  if(_lrk_rc EQUAL 0 AND EXISTS "${_lrk_wheel_src}/include/cutlass/cutlass.h")
    set(LRK_CUTLASS_INCLUDE_DIRS "${_lrk_wheel_src}/include" "${_lrk_wheel_src}/tools/util/include")
  endif()
endif()
if(LRK_CUTLASS_INCLUDE_DIRS)
  message(STATUS "lrk: CUTLASS headers at ${LRK_CUTLASS_INCLUDE_DIRS}")
else()
  message(STATUS "lrk: CUTLASS not found (pip install --no-deps nvidia-cutlass==4.2.0.0, or set CUTLASS_DIR)")
endif()
