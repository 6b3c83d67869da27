# CMake toolchain file: cross-build for aarch64 Linux with Debian's cross compiler
# (apt-get install gcc-aarch64-linux-gnu; qemu-user to run the results):
#   cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DQES_BUILD_TESTS=ON
# ctest then runs the test programs through qemu-aarch64 (CMAKE_CROSSCOMPILING_EMULATOR).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(QES_CROSS_TRIPLE aarch64-linux-gnu)
set(CMAKE_C_COMPILER ${QES_CROSS_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${QES_CROSS_TRIPLE}-g++)   # not needed by libqes; used only if a C++ target appears

# The target's root (Debian's multiarch cross sysroot): libraries and headers from there,
# programs (python3 for the golden text) from the build machine.
set(CMAKE_FIND_ROOT_PATH /usr/${QES_CROSS_TRIPLE})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# try_run and ctest run target programs through qemu's user-mode emulator.
find_program(QES_QEMU_AARCH64 qemu-aarch64)
if(QES_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${QES_QEMU_AARCH64} -L /usr/${QES_CROSS_TRIPLE})
endif()
