/* Link-only stand-in for candle-flash-attn's libflashattention.a, used by
 * tools/cuda/setup.sh for compile checks: it holds no CUDA kernels, and a
 * binary linked against it aborts with this message if flash attention is
 * actually called. */
#include <stdio.h>
#include <stdlib.h>

void run_mha(void) {
    fputs("melvae: this binary was linked against the flash-attention compile-check stub "
          "(tools/cuda/setup.sh), which has no kernels; build the real kernels with "
          "tools/cuda/build_flash_kernels.sh (docs/gpu.md)\n", stderr);
    abort();
}
