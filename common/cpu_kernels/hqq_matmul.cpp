// y[T, O] = x[T, I] W^T for an HQQ-quantized W (w = (q - z) * s, an fp16 scale and zero per
// group of consecutive inputs), reading the 2 or 4-bit codes directly: the CPU kernel behind
// common/cpu_executor.py's NativeMatrix. Built by common/cpu_kernels/__init__.py with
// `g++ -O3 -march=native -fopenmp -shared`, called through ctypes: plain C pointers, no torch.
//
// One vector lane per output row: rows go in tiles of 16 (the last padded with zero codes), and a
// tile's codes, scales and zeros are laid out so that one load gives 16 rows at once (made at
// load by NativeMatrix.repack). With b bits per code and p = 8 / b codes per byte, a tile holds,
// per 64-column block, 32 / p chunks of 32 bytes; byte 2 i + e of chunk c holds row i's columns
// 2 (p c + j) + e (j = 0 .. p - 1) at bit b j. The scales and zeros are [tile, group, 16] fp16.
// So x is broadcast, never reduced across lanes, and the group's scale multiplies 16 rows' sums in
// one instruction: y += s * (sum_i q_i x_i) - s z * sum_i x_i, the group sums of x made once.
//
// Where the build has AVX512-VNNI (Zen 4, Ice Lake and later Xeons) and the caller asks for x in
// int8 digits (x_digits = 1 or 2: common/cpu_kernels' MOE_EDGE_CPU_X_DIGITS), the codes are laid out per
// 32 bits of a row instead ("layout 2"): per tile and block of 32 / b columns, 64 bytes, whose
// dword i is row i's and whose byte k holds columns 4 j + k at bit b j. One shift and one mask
// then give 16 rows' codes of 4 columns as bytes, and vpdpbusd multiplies them by 4 int8 x and
// adds into int32: 64 products an instruction, exact, against vdpbf16ps's 32 and a vpermw per
// 32. x is rounded per token and group to digits of its largest |x| / 127: one digit (x ~ sx hi)
// or two (x ~ sx (hi + lo / 254), within |x|max / 64516 of x, finer than bf16's own rounding of a
// typical x), and y = s (q . x~) - s z sum x~: the matmul of the dequantized W by that x~.
//
// Codes are decoded by a table lookup (a code as a number in one step: vpermps, lane i ->
// i & mask) and multiplied by x in fp32 (bf16 x is widened, exactly). Where the build has
// AVX512-BF16 (Zen 4, Sapphire Rapids) and x is bf16, as the executor gives it, vdpbf16ps
// multiplies 16 rows' codes of two columns by those two x and adds both into fp32: a code (< 16)
// and a bf16 x have 4 + 8 significant bits, so each product is exact. Either way the only rounding
// beyond the reference's is the order of the fp32 sums, and it does not depend on the threads.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {  // subnormal: normalise
        int e = -1;
        uint32_t m = mantissa;
        do { m <<= 1; ++e; } while (!(m & 0x400));
        bits = sign | ((112 - e) << 23) | ((m & 0x3ff) << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}

inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// sum of n (a multiple of 64) floats, in 16 lanes where the build has AVX-512.
inline float float_sum(const float* values, int64_t n) {
#if defined(__AVX512F__)
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(values + i));
    return _mm512_reduce_add_ps(sum);
#else
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) sum += values[i];
    return sum;
#endif
}

// sum of n (a multiple of 64) bf16 values, each also written to `widened` as fp32 unless it is null.
inline float bf16_sum(const uint16_t* values, int64_t n, float* widened) {
#if defined(__AVX512F__)
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + i)));
        const __m512 floats = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));  // exact
        if (widened) _mm512_storeu_ps(widened + i, floats);
        sum = _mm512_add_ps(sum, floats);
    }
    return _mm512_reduce_add_ps(sum);
#else
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
        const float value = bf16_to_float(values[i]);
        if (widened) widened[i] = value;
        sum += value;
    }
    return sum;
#endif
}

constexpr int TILE = 16;       // rows per tile: one fp32 lane of an AVX-512 vector each
constexpr int64_t BLOCK = 64;  // columns per block of chunks: group sizes are multiples of it

struct Problem {
    const uint8_t* codes;   // [tiles, cols / 64, 32 / p, 32] in the tile layout above
    const uint16_t* scale;  // [tiles, G, 16] fp16
    const uint16_t* zero;   // [tiles, G, 16] fp16
    int64_t group_size, rows, cols, tokens;
    const float* x;         // [T, cols] fp32 (null where x_bf16 is used)
    const uint16_t* x_bf16; // [T, cols] bf16, as given (AVX512-BF16 builds with bf16 x; else null)
    const float* x_sums;    // [T, G]: sum of x (layout 1), of sx * (hi + lo / 254) (layout 2)
    float* y;               // [T, O]
    const int8_t* digits[2];  // layout 2: x's int8 digits hi, lo, each [T, cols] (lo null for one digit)
    const float* x_scale;     // layout 2: [T, G], sx = |x|max / 127 of the token's group
};

// A cache line of codes 4 KiB ahead of `chunk`, once per line: a thread's codes are one stream, and
// at one token a Zen 4 core read it 10-20% faster with this than with its hardware prefetch alone.
inline void prefetch_codes(const uint8_t* chunk) {
#if defined(__SSE__)
    _mm_prefetch(reinterpret_cast<const char*>(chunk) + 4096, _MM_HINT_T0);
#else
    (void)chunk;
#endif
}

// Chains of sums a group keeps apart: at few tokens one chain of dependent adds would bound the loop.
constexpr int chains(int tokens) { return tokens <= 2 ? 4 : tokens <= 4 ? 2 : 1; }

#if defined(__AVX512F__)
// y for tile `tile` and tokens [t0, t0 + NT): 16 rows in the lanes of one vector per token.
template <int NT>
inline void store_tile(const Problem& p, int64_t tile, int64_t t0, const __m512* acc) {
    const int64_t row0 = tile * TILE, live = std::min<int64_t>(TILE, p.rows - row0);
    const __mmask16 mask = static_cast<__mmask16>((1u << live) - 1);
    for (int t = 0; t < NT; ++t) _mm512_mask_storeu_ps(p.y + (t0 + t) * p.rows + row0, mask, acc[t]);
}

// The 16 rows' scales s and s z of group g of the tile.
struct GroupScales {
    __m512 s, sz;
};
inline GroupScales group_scales(const Problem& p, int64_t tile, int64_t g) {
    const int64_t at = (tile * (p.cols / p.group_size) + g) * TILE;
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.scale + at)));
    const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.zero + at)));
    return {s, _mm512_mul_ps(s, z)};
}

// acc[t] += s * dot[t] - s z * sum x, for group g of the tile.
template <int NT, int CHAINS>
inline void add_group(const Problem& p, int64_t tile, int64_t g, int64_t t0, __m512 (&dot)[CHAINS][NT], __m512* acc) {
    const int64_t groups = p.cols / p.group_size;
    const auto [s, sz] = group_scales(p, tile, g);
    for (int t = 0; t < NT; ++t) {
        __m512 sum = dot[0][t];
        for (int c = 1; c < CHAINS; ++c) sum = _mm512_add_ps(sum, dot[c][t]);
        acc[t] = _mm512_fmadd_ps(s, sum, acc[t]);
        acc[t] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(p.x_sums[(t0 + t) * groups + g]), acc[t]);
    }
}
#endif

#if defined(__AVX512BF16__)
// A chunk's 32 bytes widen to 32 words, word 2 i + e holding row i's code at bit b j; vpermw
// (lane k -> table[k], read from the low 5 bits of k) turns them into bf16 codes, paired as
// vdpbf16ps pairs lanes: one table of bf16(k & mask) for the codes at bits 0 and 4, one of
// bf16(k >> 2 & mask) for 2-bit codes at bits 2 and 6, so one shift serves two codes.
template <int BITS, int NT>
void tile_bf16(const Problem& p, int64_t tile, int64_t t0) {
    constexpr int PER_BYTE = 8 / BITS, MASK = (1 << BITS) - 1, CHUNKS = 32 / PER_BYTE, CHAINS = chains(NT);
    alignas(64) uint16_t words[2][32];
    for (int k = 0; k < 2; ++k)
        for (int i = 0; i < 32; ++i) {
            const float code = static_cast<float>(i >> (2 * k) & MASK);
            uint32_t bits;
            std::memcpy(&bits, &code, 4);
            words[k][i] = static_cast<uint16_t>(bits >> 16);  // exact: a code has 4 significant bits
        }
    const __m512i tables[2] = {_mm512_load_si512(words[0]), _mm512_load_si512(words[1])};
    const int64_t groups = p.cols / p.group_size, blocks_per_group = p.group_size / BLOCK;
    const uint8_t* chunk = p.codes + tile * (p.cols / BLOCK) * CHUNKS * 32;
    const uint16_t* x = p.x_bf16 + t0 * p.cols;
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m512 dot[CHAINS][NT];
        for (int c = 0; c < CHAINS; ++c)
            for (int t = 0; t < NT; ++t) dot[c][t] = _mm512_setzero_ps();
        for (int64_t block = g * blocks_per_group; block < (g + 1) * blocks_per_group; ++block) {
            // STEP chunks a pass, unrolled, so that every chain is a register
            constexpr int STEP = CHAINS > PER_BYTE ? CHAINS / PER_BYTE : 1;
            for (int c0 = 0; c0 < CHUNKS; c0 += STEP) {
#pragma GCC unroll 4
                for (int c = c0; c < c0 + STEP; ++c, chunk += 32) {
                    if (c % 2 == 0) prefetch_codes(chunk);
                    const __m512i wide = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk)));
#pragma GCC unroll 4
                    for (int j = 0; j < PER_BYTE; ++j) {
                        const int shift = BITS * j & ~3, table = (BITS * j & 3) / 2;
                        const __m512bh q = (__m512bh)_mm512_permutexvar_epi16(shift ? _mm512_srli_epi16(wide, shift) : wide, tables[table]);
                        const int64_t column = block * BLOCK + 2 * (PER_BYTE * c + j);
                        const int chain = (PER_BYTE * (c - c0) + j) % CHAINS;
                        for (int t = 0; t < NT; ++t) {
                            uint32_t pair;  // x of the columns `column` and `column + 1`, to every lane
                            std::memcpy(&pair, x + t * p.cols + column, 4);
                            dot[chain][t] = _mm512_dpbf16_ps(dot[chain][t], q, (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)));
                        }
                    }
                }
            }
        }
        add_group<NT, CHAINS>(p, tile, g, t0, dot, acc);
    }
    store_tile<NT>(p, tile, t0, acc);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Layout 2, x as int8 digits: per 64-byte block (16 rows x 32 / b columns), a shift and a mask
// per 4 columns, then one vpdpbusd per token and digit, the 4 x of those columns broadcast.
template <int BITS, int NT, int DIGITS>
void tile_int8(const Problem& p, int64_t tile, int64_t t0) {
    constexpr int PER_BYTE = 8 / BITS, COLUMNS = 4 * PER_BYTE, CHAINS = chains(NT);
    constexpr int STEP = CHAINS > PER_BYTE ? CHAINS / PER_BYTE : 1;  // blocks a pass: every chain a register
    const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
    const int64_t groups = p.cols / p.group_size, blocks_per_group = p.group_size / COLUMNS;
    const uint8_t* block = p.codes + tile * (p.cols / COLUMNS) * 64;
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m512i dot[DIGITS][CHAINS][NT];
        for (int d = 0; d < DIGITS; ++d)
            for (int c = 0; c < CHAINS; ++c)
                for (int t = 0; t < NT; ++t) dot[d][c][t] = _mm512_setzero_si512();
        for (int64_t b0 = g * blocks_per_group; b0 < (g + 1) * blocks_per_group; b0 += STEP) {
#pragma GCC unroll 2
            for (int b = 0; b < STEP; ++b, block += 64) {
                prefetch_codes(block);
                const __m512i codes = _mm512_loadu_si512(block);
#pragma GCC unroll 4
                for (int j = 0; j < PER_BYTE; ++j) {
                    const __m512i q = _mm512_and_si512(j ? _mm512_srli_epi32(codes, BITS * j) : codes, mask);
                    const int64_t column = (b0 + b) * COLUMNS + 4 * j;
                    const int chain = (PER_BYTE * b + j) % CHAINS;
                    for (int t = 0; t < NT; ++t)
                        for (int d = 0; d < DIGITS; ++d) {
                            int32_t four;  // the token's digits of the 4 columns, to every lane
                            std::memcpy(&four, p.digits[d] + (t0 + t) * p.cols + column, 4);
                            dot[d][chain][t] = _mm512_dpbusd_epi32(dot[d][chain][t], q, _mm512_set1_epi32(four));
                        }
                }
            }
        }
        const auto [s, sz] = group_scales(p, tile, g);
        for (int t = 0; t < NT; ++t) {
            __m512 sum[DIGITS];
            for (int d = 0; d < DIGITS; ++d) {
                __m512i digit_sum = dot[d][0][t];
                for (int c = 1; c < CHAINS; ++c) digit_sum = _mm512_add_epi32(digit_sum, dot[d][c][t]);
                sum[d] = _mm512_cvtepi32_ps(digit_sum);  // exact: |sum| < 2^24 for groups up to 8192
            }
            const __m512 products = DIGITS == 2 ? _mm512_fmadd_ps(sum[1], _mm512_set1_ps(1.f / 254), sum[0]) : sum[0];
            const int64_t tg = (t0 + t) * groups + g;
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(p.x_scale[tg])), products, acc[t]);
            acc[t] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(p.x_sums[tg]), acc[t]);
        }
    }
    store_tile<NT>(p, tile, t0, acc);
}
#endif

#if defined(__AVX512F__)
// fp32 x: a chunk's 32 bytes as 16 words widen to 16 dwords, dword i holding row i's codes of
// the even column at bit b j and of the odd one at 8 + b j; vpermps reads the low 4 bits.
template <int BITS, int NT>
void tile_fp32(const Problem& p, int64_t tile, int64_t t0) {
    constexpr int PER_BYTE = 8 / BITS, MASK = (1 << BITS) - 1, CHUNKS = 32 / PER_BYTE, CHAINS = chains(NT);
    const __m512 table = _mm512_setr_ps(0 & MASK, 1 & MASK, 2 & MASK, 3 & MASK, 4 & MASK, 5 & MASK, 6 & MASK, 7 & MASK,
                                        8 & MASK, 9 & MASK, 10 & MASK, 11 & MASK, 12 & MASK, 13 & MASK, 14 & MASK, 15 & MASK);
    const int64_t groups = p.cols / p.group_size, blocks_per_group = p.group_size / BLOCK;
    const uint8_t* chunk = p.codes + tile * (p.cols / BLOCK) * CHUNKS * 32;
    const float* x = p.x + t0 * p.cols;
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m512 dot[CHAINS][NT];
        for (int c = 0; c < CHAINS; ++c)
            for (int t = 0; t < NT; ++t) dot[c][t] = _mm512_setzero_ps();
        for (int64_t block = g * blocks_per_group; block < (g + 1) * blocks_per_group; ++block) {
            for (int c = 0; c < CHUNKS; ++c, chunk += 32) {
                if (c % 2 == 0) prefetch_codes(chunk);
                const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk)));
#pragma GCC unroll 8
                for (int k = 0; k < 2 * PER_BYTE; ++k) {
                    const int j = k / 2, e = k % 2, shift = 8 * e + BITS * j;
                    const __m512 q = _mm512_permutexvar_ps(shift ? _mm512_srli_epi32(wide, shift) : wide, table);
                    const int64_t column = block * BLOCK + 2 * (PER_BYTE * c + j) + e;
                    const int chain = k % CHAINS;
                    for (int t = 0; t < NT; ++t)
                        dot[chain][t] = _mm512_fmadd_ps(q, _mm512_set1_ps(x[t * p.cols + column]), dot[chain][t]);
                }
            }
        }
        add_group<NT, CHAINS>(p, tile, g, t0, dot, acc);
    }
    store_tile<NT>(p, tile, t0, acc);
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
// AVX2: a tile as two halves of 8 rows (bytes 0-15 and 16-31 of each chunk), as tile_fp32.
template <int BITS, int NT>
void tile_fp32(const Problem& p, int64_t tile, int64_t t0) {
    constexpr int PER_BYTE = 8 / BITS, MASK = (1 << BITS) - 1, CHUNKS = 32 / PER_BYTE, CHAINS = chains(NT);
    const __m256i mask = _mm256_set1_epi32(MASK);
    const __m256 table = _mm256_setr_ps(0 & MASK, 1 & MASK, 2 & MASK, 3 & MASK, 4 & MASK, 5 & MASK, 6 & MASK, 7 & MASK);
    const int64_t groups = p.cols / p.group_size, blocks_per_group = p.group_size / BLOCK;
    const float* x = p.x + t0 * p.cols;
    for (int half = 0; half < 2; ++half) {
        const uint8_t* chunk = p.codes + tile * (p.cols / BLOCK) * CHUNKS * 32 + 16 * half;
        __m256 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
            __m256 dot[CHAINS][NT];
            for (int c = 0; c < CHAINS; ++c)
                for (int t = 0; t < NT; ++t) dot[c][t] = _mm256_setzero_ps();
            for (int64_t block = g * blocks_per_group; block < (g + 1) * blocks_per_group; ++block) {
                for (int c = 0; c < CHUNKS; ++c, chunk += 32) {
                    if (c % 2 == 0) prefetch_codes(chunk);
                    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk)));
#pragma GCC unroll 8
                    for (int k = 0; k < 2 * PER_BYTE; ++k) {
                        const int j = k / 2, e = k % 2, shift = 8 * e + BITS * j;
                        const __m256i shifted = shift ? _mm256_srli_epi32(wide, shift) : wide;
                        // vpermps reads 3 bits: enough for 2-bit codes; 4-bit ones are masked and converted
                        const __m256 q = BITS == 2 ? _mm256_permutevar8x32_ps(table, shifted)
                                                   : _mm256_cvtepi32_ps(_mm256_and_si256(shifted, mask));
                        const int64_t column = block * BLOCK + 2 * (PER_BYTE * c + j) + e;
                        const int chain = k % CHAINS;
                        for (int t = 0; t < NT; ++t)
                            dot[chain][t] = _mm256_fmadd_ps(q, _mm256_set1_ps(x[t * p.cols + column]), dot[chain][t]);
                    }
                }
            }
            const int64_t at = (tile * groups + g) * TILE + 8 * half;
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.scale + at)));
            const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zero + at)));
            const __m256 sz = _mm256_mul_ps(s, z);
            for (int t = 0; t < NT; ++t) {
                __m256 sum = dot[0][t];
                for (int c = 1; c < CHAINS; ++c) sum = _mm256_add_ps(sum, dot[c][t]);
                acc[t] = _mm256_fmadd_ps(s, sum, acc[t]);
                acc[t] = _mm256_fnmadd_ps(sz, _mm256_set1_ps(p.x_sums[(t0 + t) * groups + g]), acc[t]);
            }
        }
        const int64_t row0 = tile * TILE + 8 * half, live = std::min<int64_t>(8, p.rows - row0);
        for (int t = 0; t < NT; ++t) {
            alignas(32) float lanes[8];
            _mm256_store_ps(lanes, acc[t]);
            for (int64_t i = 0; i < live; ++i) p.y[(t0 + t) * p.rows + row0 + i] = lanes[i];
        }
    }
}
#endif

#if !defined(__AVX512F__) && !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
// Plain C++: the same sums, a row at a time.
template <int BITS, int NT>
void tile_fp32(const Problem& p, int64_t tile, int64_t t0) {
    constexpr int PER_BYTE = 8 / BITS, MASK = (1 << BITS) - 1, CHUNKS = 32 / PER_BYTE;
    const int64_t groups = p.cols / p.group_size, blocks_per_group = p.group_size / BLOCK;
    const uint8_t* codes = p.codes + tile * (p.cols / BLOCK) * CHUNKS * 32;
    for (int64_t i = 0; i < TILE && tile * TILE + i < p.rows; ++i) {
        float acc[NT] = {};
        for (int64_t g = 0; g < groups; ++g) {
            float dot[NT] = {};
            for (int64_t block = g * blocks_per_group; block < (g + 1) * blocks_per_group; ++block)
                for (int c = 0; c < CHUNKS; ++c)
                    for (int e = 0; e < 2; ++e) {
                        const uint8_t byte = codes[(block * CHUNKS + c) * 32 + 2 * i + e];
                        for (int j = 0; j < PER_BYTE; ++j) {
                            const float q = static_cast<float>((byte >> (BITS * j)) & MASK);
                            const int64_t column = block * BLOCK + 2 * (PER_BYTE * c + j) + e;
                            for (int t = 0; t < NT; ++t) dot[t] += q * p.x[(t0 + t) * p.cols + column];
                        }
                    }
            const float s = half_to_float(p.scale[(tile * groups + g) * TILE + i]);
            const float z = half_to_float(p.zero[(tile * groups + g) * TILE + i]);
            for (int t = 0; t < NT; ++t) acc[t] += s * dot[t] - s * z * p.x_sums[(t0 + t) * groups + g];
        }
        for (int t = 0; t < NT; ++t) p.y[(t0 + t) * p.rows + tile * TILE + i] = acc[t];
    }
}
#endif

#if defined(__AVX512F__)
constexpr int MAX_TILE = 8;  // tokens per pass over a tile: 8 accumulators and 8 sums of 32 registers
#else
constexpr int MAX_TILE = 4;  // AVX2 has 16 registers
#endif

template <int BITS, int NT>
void tile_tokens(const Problem& p, int64_t tile, int64_t t0) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (p.digits[0]) return p.digits[1] ? tile_int8<BITS, NT, 2>(p, tile, t0) : tile_int8<BITS, NT, 1>(p, tile, t0);
#endif
#if defined(__AVX512BF16__)
    if (p.x_bf16) return tile_bf16<BITS, NT>(p, tile, t0);
#endif
    tile_fp32<BITS, NT>(p, tile, t0);
}

// Every token for tile `tile`, MAX_TILE at a time: the tile's codes (2 * cols * bits bytes) stay
// in L2 for the passes after the first.
template <int BITS>
void tile_all_tokens(const Problem& p, int64_t tile) {
    for (int64_t t0 = 0; t0 < p.tokens; t0 += MAX_TILE) {
        switch (std::min<int64_t>(p.tokens - t0, MAX_TILE)) {
            case 1: tile_tokens<BITS, 1>(p, tile, t0); break;
            case 2: tile_tokens<BITS, 2>(p, tile, t0); break;
            case 3: tile_tokens<BITS, 3>(p, tile, t0); break;
            case 4: tile_tokens<BITS, 4>(p, tile, t0); break;
#if defined(__AVX512F__)
            case 5: tile_tokens<BITS, 5>(p, tile, t0); break;
            case 6: tile_tokens<BITS, 6>(p, tile, t0); break;
            case 7: tile_tokens<BITS, 7>(p, tile, t0); break;
            case 8: tile_tokens<BITS, 8>(p, tile, t0); break;
#endif
        }
    }
}

// x [T, cols] (fp32, or bf16 where x_is_bf16) as int8 digits per token and group: sx = |x|max / 127,
// hi = round(x / sx), lo = round((x / sx - hi) 254) (|lo| <= 127 as |x / sx - hi| <= 1/2); and
// per token and group sx and the sum of x~ = sx (hi + lo / 254), from the digits, so that the
// zero's term is that of the x the products use.
void to_digits(const void* x, bool x_is_bf16, int64_t tokens, int64_t cols, int64_t group_size, int digits,
               int8_t* hi, int8_t* lo, float* x_scale, float* x_sums) {
    const int64_t groups = cols / group_size;
    std::vector<float> values(group_size);
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t start = t * cols + g * group_size;
            float largest = 0.f;
            for (int64_t i = 0; i < group_size; ++i) {
                values[i] = x_is_bf16 ? bf16_to_float(static_cast<const uint16_t*>(x)[start + i])
                                      : static_cast<const float*>(x)[start + i];
                largest = std::max(largest, std::fabs(values[i]));
            }
            const float scale = largest / 127.f, inverse = largest > 0.f ? 127.f / largest : 0.f;
            int64_t hi_sum = 0, lo_sum = 0;
            for (int64_t i = 0; i < group_size; ++i) {
                const float v = std::min(127.f, std::max(-127.f, values[i] * inverse));  // the clamp: v's rounding
                const float h = std::nearbyint(v);
                hi[start + i] = static_cast<int8_t>(h);
                hi_sum += static_cast<int64_t>(h);
                if (digits == 2) {
                    const float l = std::min(127.f, std::max(-127.f, std::nearbyint((v - h) * 254.f)));
                    lo[start + i] = static_cast<int8_t>(l);
                    lo_sum += static_cast<int64_t>(l);
                }
            }
            x_scale[t * groups + g] = scale;
            x_sums[t * groups + g] = scale * (static_cast<float>(hi_sum) + static_cast<float>(lo_sum) / 254.f);
        }
}

}  // namespace

extern "C" {

// What the build chose, for the log: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (scalar).
int hqq_vector_bits() {
#if defined(__AVX512F__)
    int bits = 512;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    int bits = 256;
#else
    int bits = 0;
#endif
    return bits;
}

// 1 where bf16 x is multiplied through vdpbf16ps (AVX512-BF16), else 0: for the log.
int hqq_bf16_products() {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

// 1 where x can be multiplied as int8 digits through vpdpbusd (AVX512-VNNI), in layout 2, else 0.
int hqq_int8_products() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

// x is [T, cols], fp32 (x_is_bf16 = 0) or bf16 (1); y is [T, rows] fp32. tiles_per_take: 0 splits
// the tiles into one share per thread, n > 0 hands them out n at a time. x_digits: 0, the codes
// in layout 1 and x multiplied as given; 1 or 2, the codes in layout 2 and x as that many int8
// digits (AVX512-VNNI builds only). Returns 0, or -1 for a shape the layout cannot hold or
// digits the build cannot multiply (the caller checks these first).
int hqq_matmul(const uint8_t* codes, const uint16_t* scale, const uint16_t* zero, int bits, int64_t group_size,
               int64_t rows, int64_t cols, const void* x, int x_is_bf16, int64_t tokens, float* y, int threads,
               int64_t tiles_per_take, int x_digits) {
    if ((bits != 2 && bits != 4) || group_size <= 0 || cols % group_size || group_size % BLOCK) return -1;
    if (x_digits < 0 || x_digits > 2 || (x_digits && !hqq_int8_products())) return -1;
    const int64_t groups = cols / group_size;
#if defined(__AVX512BF16__)
    const bool keep_bf16 = x_is_bf16;  // multiplied as given
#else
    const bool keep_bf16 = false;
#endif
    // fp32 x as given; bf16 x as given or widened, where the build has no vdpbf16ps
    std::vector<float> widened(x_is_bf16 && !keep_bf16 && !x_digits ? tokens * cols : 0), x_sums(tokens * groups);
    std::vector<int8_t> hi(x_digits ? tokens * cols : 0), lo(x_digits == 2 ? tokens * cols : 0);
    std::vector<float> x_scale(x_digits ? tokens * groups : 0);
    const float* x32 = x_is_bf16 ? widened.data() : static_cast<const float*>(x);
    if (x_digits)
        to_digits(x, x_is_bf16, tokens, cols, group_size, x_digits, hi.data(), lo.data(), x_scale.data(), x_sums.data());
    else
        for (int64_t t = 0; t < tokens; ++t)
            for (int64_t g = 0; g < groups; ++g) {
                const int64_t start = t * cols + g * group_size;
                if (x_is_bf16) x_sums[t * groups + g] = bf16_sum(static_cast<const uint16_t*>(x) + start, group_size,
                                                                 keep_bf16 ? nullptr : widened.data() + start);
                else x_sums[t * groups + g] = float_sum(x32 + start, group_size);
            }
    const Problem p{codes, scale, zero, group_size, rows, cols, tokens, keep_bf16 || x_digits ? nullptr : x32,
                    keep_bf16 && !x_digits ? static_cast<const uint16_t*>(x) : nullptr, x_sums.data(), y,
                    {x_digits ? hi.data() : nullptr, x_digits == 2 ? lo.data() : nullptr}, x_scale.data()};
    const int64_t tiles = (rows + TILE - 1) / TILE;
    // tiles_per_take > 0: runs of that many tiles handed out in turn, so that where the CPU also
    // drives a GPU or serves a network a thread that loses its core holds up its own run, not the
    // whole call; 0: one contiguous share per thread (a run each, dealt in thread order). Either
    // way a run's codes are one stream and its rows of y its own.
    threads = std::max(threads, 1);
    const int64_t take = tiles_per_take > 0 ? tiles_per_take : (tiles + threads - 1) / threads;
    omp_set_schedule(tiles_per_take > 0 ? omp_sched_dynamic : omp_sched_static, 1);
#pragma omp parallel for num_threads(threads) schedule(runtime)
    for (int64_t run = 0; run < (tiles + take - 1) / take; ++run) {
        const int64_t end = std::min(tiles, (run + 1) * take);
        for (int64_t tile = run * take; tile < end; ++tile) {
            if (bits == 2) tile_all_tokens<2>(p, tile);
            else tile_all_tokens<4>(p, tile);
        }
    }
    return 0;
}

}  // extern "C"
