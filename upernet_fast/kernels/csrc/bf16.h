/* bfloat16 <-> float32 for the C helpers: widening is exact; narrowing rounds to nearest even, as
 * PyTorch's .to(torch.bfloat16) does (NaN stays NaN). */
#ifndef UPERNET_FAST_BF16_H
#define UPERNET_FAST_BF16_H
#include <stdint.h>
#include <string.h>

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN (the rounding add could make it inf) */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#endif
