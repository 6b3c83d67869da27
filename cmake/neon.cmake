# NEON kernels for aarch64 (native/src/neon/kernels_neon.c, into libqes), included by
# CMakeLists.txt after the AVX2 block.  Every aarch64 core has AdvSIMD: no flag, no run-time check.
# Also the host tests that exercise every backend through the public API (built with
# QES_BUILD_TESTS on any processor): golden_check (docs/noise-golden.json) and bench_backends.
option(QES_NEON "Build the NEON kernels (aarch64)" ON)
if(QES_NEON AND CMAKE_SYSTEM_PROCESSOR MATCHES "aarch64|arm64|ARM64")
  target_sources(qes PRIVATE native/src/neon/kernels_neon.c)
  target_compile_definitions(qes PRIVATE QES_HAVE_NEON=1)
  list(APPEND QES_BACKENDS "neon")
endif()

if(QES_BUILD_TESTS)
  enable_testing()
  foreach(qes_prog golden_check bench_backends)
    add_executable(${qes_prog} native/tests/${qes_prog}.c)
    target_include_directories(${qes_prog} PRIVATE native/include native/src)
    target_link_libraries(${qes_prog} PRIVATE qes)
    if(QES_SANITIZE)
      target_compile_options(${qes_prog} PRIVATE -fsanitize=address,undefined -fno-sanitize-recover=all -g)
      target_link_options(${qes_prog} PRIVATE -fsanitize=address,undefined)
    endif()
  endforeach()
  # The golden vectors as plain text for C (tests/golden_text.py: Python's standard library only),
  # written at build time; without a Python interpreter the test is left out (the scripts pass
  # the file themselves).  A cross build finds the build machine's Python (programs are not
  # searched in the target's root) and runs golden_check through CMAKE_CROSSCOMPILING_EMULATOR.
  find_program(QES_PYTHON NAMES python3 python)
  if(QES_PYTHON)
    set(QES_GOLDEN_TXT ${CMAKE_CURRENT_BINARY_DIR}/noise-golden.txt)
    add_custom_command(OUTPUT ${QES_GOLDEN_TXT}
      COMMAND ${QES_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/tests/golden_text.py
              --json ${CMAKE_CURRENT_SOURCE_DIR}/docs/noise-golden.json --out ${QES_GOLDEN_TXT}
      DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/tests/golden_text.py ${CMAKE_CURRENT_SOURCE_DIR}/docs/noise-golden.json
      COMMENT "golden vectors as text for golden_check")
    add_custom_target(golden_text ALL DEPENDS ${QES_GOLDEN_TXT})
    add_test(NAME golden COMMAND golden_check ${QES_GOLDEN_TXT})
  else()
    message(STATUS "qes-edge: no Python found, the golden test is not registered with ctest")
  endif()
endif()
