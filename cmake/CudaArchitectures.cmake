# Turns a PyTorch-style arch list ("8.0;9.0a", "8.0+PTX") into CMake's
# CUDA_ARCHITECTURES form ("80-real;90a-real", "80"), and tells which entries
# are Hopper-only targets ("9.0a") for the sm90/ sources.

# Default targets: sm_80 machine code plus compute_80 PTX for the portable
# kernels, so that GPUs newer than the list (sm_100 B200, sm_120 RTX 50) JIT the
# PTX at first load instead of failing with "no kernel image"; sm_90a machine
# code for Hopper (the sm90/ sources build for 9.0a alone: 9.0a code runs on no
# other GPU, and they are never dispatched elsewhere). Add "10.0a" or "12.0" for
# machine code on those GPUs (no JIT at load time).
set(LRK_DEFAULT_CUDA_ARCH_LIST "8.0+PTX;9.0a")

function(lrk_parse_arch_list input out_all out_sm90a)
  string(REPLACE " " ";" _list "${input}")
  set(_all "")
  set(_has_sm90a OFF)
  foreach(_arch IN LISTS _list)
    if(_arch STREQUAL "")
      continue()
    endif()
    set(_ptx OFF)
    if(_arch MATCHES "\\+PTX$")
      set(_ptx ON)
      string(REGEX REPLACE "\\+PTX$" "" _arch "${_arch}")
    endif()
    if(NOT _arch MATCHES "^[0-9]+\\.[0-9]+[af]?$")
      message(FATAL_ERROR "LRK_CUDA_ARCH_LIST: '${_arch}' is not an arch like 8.0, 9.0a or 8.6+PTX")
    endif()
    string(REPLACE "." "" _num "${_arch}")
    if(_num STREQUAL "90a")
      set(_has_sm90a ON)
    endif()
    if(_ptx)
      list(APPEND _all "${_num}")          # SASS and PTX
    else()
      list(APPEND _all "${_num}-real")     # SASS only
    endif()
  endforeach()
  if(_all STREQUAL "")
    message(FATAL_ERROR "LRK_CUDA_ARCH_LIST is empty")
  endif()
  set(${out_all} "${_all}" PARENT_SCOPE)
  set(${out_sm90a} "${_has_sm90a}" PARENT_SCOPE)
endfunction()
