# The emulated build of lrk's portable CUDA kernels (csrc/emu/README.md): every
# csrc/<family>/*.cu compiled as C++ against the CPU emulator of the CUDA
# execution model, into a second library whose ops live in the lrk_emu
# namespace and take CPU tensors. No emulator code is linked into the real
# library, and the real CUDA build does not change.
#
#   LRK_EMU_SANITIZE  "" (default) or a -fsanitize= list, e.g. "address,undefined"
#   LRK_OUTPUT_NAME   file name of the library (_C_emu; _C_emu_asan when sanitized)

set(LRK_EMU_SANITIZE "" CACHE STRING "sanitizers for the emulated build, e.g. address,undefined")

# cuda_fp16.h, cuda_bf16.h, vector_types.h and cuda_runtime_api.h (host-usable
# headers): from the CUDA toolkit, else from the CUDA runtime wheel that a CUDA
# torch installs.
find_package(CUDAToolkit QUIET)
find_path(LRK_EMU_CUDA_INCLUDE cuda_fp16.h
  PATHS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include ${LRK_TORCH_EXTRA_CUDA_INCLUDE_DIRS}
  NO_DEFAULT_PATH)
if(NOT LRK_EMU_CUDA_INCLUDE)
  message(FATAL_ERROR "the emulated build needs CUDA's host headers (cuda_fp16.h): install the CUDA toolkit "
                      "or a CUDA build of torch")
endif()

# Each .cu file is compiled through a generated C++ file that includes it, so
# the same source stays a CUDA source for the real build.
file(GLOB LRK_EMU_CUDA_SOURCES CONFIGURE_DEPENDS
  "${CMAKE_CURRENT_SOURCE_DIR}/csrc/*/*.cu"
  "${CMAKE_CURRENT_SOURCE_DIR}/csrc/emu/selftest/*.cu")
set(LRK_EMU_WRAPPERS "")
foreach(_src IN LISTS LRK_EMU_CUDA_SOURCES)
  file(RELATIVE_PATH _rel "${CMAKE_CURRENT_SOURCE_DIR}/csrc" "${_src}")
  string(REPLACE "/" "__" _name "${_rel}")
  set(_wrapper "${CMAKE_CURRENT_BINARY_DIR}/emu_sources/${_name}.cpp")
  file(CONFIGURE OUTPUT "${_wrapper}" CONTENT "// ${_rel}, compiled against the CUDA emulator\n#include \"${_src}\"\n")
  list(APPEND LRK_EMU_WRAPPERS "${_wrapper}")
endforeach()

add_library(lrk_emu SHARED
  ${LRK_EMU_WRAPPERS}
  "${CMAKE_CURRENT_SOURCE_DIR}/csrc/registration.cpp"      # the schemas, in lrk_emu
  "${CMAKE_CURRENT_SOURCE_DIR}/csrc/emu/emu_ops.cpp"        # schedule and counters
  # host code that the CUDA sources call (no op registrations in these files)
  "${CMAKE_CURRENT_SOURCE_DIR}/csrc/kron/kron_portable.cpp"
  "${CMAKE_CURRENT_SOURCE_DIR}/csrc/galore/galore_step.cpp")
target_include_directories(lrk_emu BEFORE PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc/emu/shim")
target_include_directories(lrk_emu PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
target_include_directories(lrk_emu SYSTEM PRIVATE ${LRK_TORCH_INCLUDE_DIRS} "${LRK_EMU_CUDA_INCLUDE}")
target_compile_definitions(lrk_emu PRIVATE ${LRK_COMMON_DEFINES} LRK_EMULATED=1 LRK_WITH_CUDA=1
  # the same half-precision rules as the nvcc build
  __CUDA_NO_HALF_OPERATORS__ __CUDA_NO_HALF_CONVERSIONS__ __CUDA_NO_BFLOAT16_CONVERSIONS__
  __CUDA_NO_HALF2_OPERATORS__)
target_compile_options(lrk_emu PRIVATE
  -include "${CMAKE_CURRENT_SOURCE_DIR}/csrc/emu/emu_cuda.h"
  # device code reads half arrays through uint4 and the like, as CUDA allows
  -fno-strict-aliasing
  -Wall -Wno-unused-function -Wno-unused-variable -Wno-unknown-pragmas)
set(_lrk_emu_link_options -Wl,--no-undefined -Wl,-Bsymbolic)
if(LRK_EMU_SANITIZE)
  target_compile_options(lrk_emu PRIVATE -fsanitize=${LRK_EMU_SANITIZE} -fno-omit-frame-pointer -g -O1)
  list(APPEND _lrk_emu_link_options -fsanitize=${LRK_EMU_SANITIZE})
endif()
target_link_options(lrk_emu PRIVATE ${_lrk_emu_link_options})
foreach(_lib c10 torch_cpu torch)
  find_library(LRK_EMU_LIB_${_lib} NAMES ${_lib} PATHS "${LRK_TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(lrk_emu PRIVATE "${LRK_EMU_LIB_${_lib}}")
endforeach()
set_target_properties(lrk_emu PROPERTIES
  PREFIX "" OUTPUT_NAME "${LRK_OUTPUT_NAME}" SUFFIX "${LRK_OUTPUT_SUFFIX}"
  CXX_VISIBILITY_PRESET hidden
  INSTALL_RPATH "$ORIGIN/../torch/lib" BUILD_WITH_INSTALL_RPATH ON)
