// optc's Winograd kernels for one vector width: included by winograd_builds.h once per instruction set, inside a
// namespace and a GCC target region that define kW (floats a vector holds). Each tile is winograd_tile.h built
// with its own kM, the output tile's side.
namespace m4 {
constexpr int kM = 4;  // F(4x4, 3x3)
#include "winograd_tile.h"
}  // namespace m4
namespace m2 {
constexpr int kM = 2;  // F(2x2, 3x3)
#include "winograd_tile.h"
}  // namespace m2
