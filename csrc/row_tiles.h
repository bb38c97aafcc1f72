// The walk every weight-only CPU linear (gguf_linear.cpp, int3_linear.cpp) makes over its
// products: which activation rows meet which weight rows, and in what order.
//
// Threads split the output (weight) rows, so each reads its own slice of the weight once.
// Activation rows go eight, then four, then three or two, then one at a time through each weight
// row (each group of the weight decoded once for all of them) while the weight row stays in L1:
// a batch of decode rows then costs little more decoding than one row. The three- and two-row
// tiles are for the few-row forwards a step policy's target sees (two or three escalated
// requests decoding at once), where one-row tiles decoded the weight once per row. Every tile size does the same
// arithmetic per row, so a row's result does not depend on how many rows share the call.
// A prefill has far more rows than a tile: walking every tile against one weight row at a time
// would stream all the quantized activations (over a megabyte for a wide down projection, more
// than L2) once per weight row. Weight rows go in panels of about 64 KiB instead, and each tile
// runs over a whole panel, so the tile and the panel both stay in cache; each output is still
// one call of the same kernel, so the results are bit for bit the same.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

// A kernel's dots for every tile height `run` takes, in a Kernels struct's order (one, two,
// three, four, eight).
#define AF_ROW_TILES(dot) dot<1>, dot<2>, dot<3>, dot<4>, dot<8>

namespace arbitrage_fast::row_tiles {

// dot(j, r, tile, dots) computes activation rows r .. r + tile - 1 (tile is 8, 4, 3, 2 or 1)
// against weight row j into dots[0 .. tile); `eight`, `four` and `small` say whether the kernel
// has those tiles (`small`: both three and two).
// Each fp32 dot is stored in out's type (a 16-bit output rounds as Tensor.to rounds), so a
// 16-bit layer needs no fp32 result and no conversion pass after it.
template <class T, class Dot>
void run(int64_t rows, int64_t n, int64_t row_bytes, bool eight, bool four, bool small, T* out, const Dot& dot) {
  const int64_t panel = std::max<int64_t>(1, std::min<int64_t>(64, (64 << 10) / row_bytes));
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    float dots[8];
    for (int64_t j0 = begin; j0 < end; j0 += panel) {
      const int64_t j1 = std::min(end, j0 + panel);
      int64_t r = 0;
      for (const int tile : {8, 4, 3, 2}) {
        if ((tile == 8 && !eight) || (tile == 4 && !four) || (tile < 4 && !small)) continue;
        for (; r + tile <= rows; r += tile) {
          for (int64_t j = j0; j < j1; ++j) {
            dot(j, r, tile, dots);
            for (int i = 0; i < tile; ++i) out[(r + i) * n + j] = static_cast<T>(dots[i]);
          }
        }
      }
      for (; r < rows; ++r) {
        for (int64_t j = j0; j < j1; ++j) {
          dot(j, r, 1, dots);
          out[r * n + j] = static_cast<T>(dots[0]);
        }
      }
    }
  });
}

}  // namespace arbitrage_fast::row_tiles
