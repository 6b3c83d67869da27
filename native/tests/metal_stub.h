/* metal_stub.h -- just enough of the Metal Shading Language's vocabulary, as C++, for the host
 * tests to check that qes_metal.metal and the headers it is built from parse and type-check
 * (tests/test_metal_logic.py); nothing here runs. */
#include <cstdint>
#define __METAL_VERSION__ 300
#define kernel
#define device
#define constant
#define thread
namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
}
typedef unsigned int uint;
