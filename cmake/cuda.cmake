# The CUDA backend: the plugin libqes_cuda.so, built beside libqes when CMake finds nvcc.
# backend.c dlopens it from libqes's folder on first use of the "cuda" backend, so a process
# that never asks for CUDA never maps the CUDA runtime (linked statically into the plugin:
# only the driver, libcuda, is needed at run time, and without it the backend reports itself
# not available instead of failing to load).
set(QES_CUDA AUTO CACHE STRING "Build the CUDA plugin: AUTO (when CMake finds nvcc), ON, OFF")
set_property(CACHE QES_CUDA PROPERTY STRINGS AUTO ON OFF)

if(NOT QES_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    if(QES_CUDA STREQUAL "ON")
      message(FATAL_ERROR "qes-edge: QES_CUDA=ON but no CUDA compiler (nvcc) was found: install the CUDA "
                          "toolkit or set CMAKE_CUDA_COMPILER, or build with -DQES_CUDA=OFF.")
    endif()
    message(STATUS "qes-edge: no nvcc found, the CUDA plugin is not built")
  else()
    # Real code for Ampere datacenter (sm_80), Jetson Orin (sm_87) and Hopper (sm_90), plus
    # sm_90 PTX that the driver compiles for newer GPUs.  CUDA 13 no longer targets sm_72
    # (Jetson Xavier).  Override with -DCMAKE_CUDA_ARCHITECTURES=...
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES "80-real;87-real;90")
    endif()
    enable_language(CUDA)
    # -O2 as libqes (the Release default -O3 would only make nvcc warn about two levels)
    string(REPLACE "-O3" "-O2" CMAKE_CUDA_FLAGS_RELEASE "${CMAKE_CUDA_FLAGS_RELEASE}")
    add_library(qes_cuda SHARED native/src/cuda/ops_cuda.cu)
    target_include_directories(qes_cuda PRIVATE native/include native/src)
    target_link_libraries(qes_cuda PRIVATE qes)
    # integers only, but no contraction or fast math anywhere near bit-identical code
    target_compile_options(qes_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O2 --fmad=false -Xcompiler=-fvisibility=hidden>)
    set_target_properties(qes_cuda PROPERTIES
      CUDA_RUNTIME_LIBRARY Static
      CUDA_STANDARD 17
      CUDA_STANDARD_REQUIRED ON
      BUILD_RPATH "$ORIGIN"
      INSTALL_RPATH "$ORIGIN")
    if(SKBUILD)
      install(TARGETS qes_cuda LIBRARY DESTINATION qes_edge)
    endif()
    list(APPEND QES_BACKENDS "cuda")
  endif()
endif()
