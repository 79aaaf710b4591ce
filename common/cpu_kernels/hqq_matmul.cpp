// y[T, O] = x[T, I] W^T for an HQQ-quantized W (w = (q - z) * s, an fp16 scale and zero per
// group of consecutive inputs), reading the 2 or 4-bit codes directly: the CPU kernel behind
// common/cpu_executor.py's NativeMatrix. Built by common/cpu_kernels/__init__.py with
// `g++ -O3 -march=native -fopenmp -shared`, called through ctypes: plain C pointers, no torch.
//
// Code layout (made at load by NativeMatrix.repack): each row is a run of 32-byte units, the row
// padded with zero codes to whole units. With b bits per code and p = 8 / b codes per byte, a
// unit holds 32 p consecutive columns, byte w holding the columns 32 j + w (j = 0 .. p - 1) at
// bit b j. So a 16-byte half widened to 32-bit lanes and shifted by b j gives the codes of 16
// consecutive columns (AVX2: an 8-byte quarter, 8 of them).
//
// Per row and group: y += s * (sum_i q_i x_i - z * sum_i x_i); the group sums of x are made
// once per call. Codes are decoded by a table lookup (vpermps: lane i -> i & mask, a code as a
// float in one step) and multiplied by x in fp32 (bf16 x is widened, exactly). The only rounding
// beyond the reference's is the order of the fp32 sums. Where the build has AVX512-BF16 (Zen 4,
// Sapphire Rapids) and x is bf16, as the executor gives it, vdpbf16ps multiplies 32 codes by 32 x
// and sums them pairwise into fp32, which halves the instructions per code (row_dot_bf16): still
// exact products, fp32 sums.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
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

constexpr int64_t BLOCK = 64;  // columns per scale step: group sizes are multiples of it

struct Problem {
    const uint8_t* codes;   // [O, U * 32] in the unit layout above
    const uint16_t* scale;  // [O, G] fp16
    const uint16_t* zero;   // [O, G] fp16
    int64_t group_size, rows, cols, padded_cols, tokens;
    const float* x;         // [T, x_stride] fp32, zero past cols (null where x_bf16 is used)
    const uint16_t* x_bf16; // [T, x_stride] bf16, zero past cols (AVX512-BF16 builds, bf16 x; else null)
    int64_t x_stride;       // padded_cols + 32: tokens' rows of x not 4 KiB apart, so not in the same L1 sets
    const float* x_sums;    // [T, G]
    float* y;               // [T, O]
};

// n fp16 values as float32.
inline void halves_to_floats(const uint16_t* halves, float* floats, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(floats + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(halves + i))));
#endif
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(floats + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(halves + i))));
#endif
    for (; i < n; ++i) floats[i] = half_to_float(halves[i]);
}

// sum_i a_i b_i c_i over n values.
inline float triple_dot(const float* a, const float* b, const float* c, int64_t n) {
    int64_t i = 0;
    float sum = 0.f;
#if defined(__AVX512F__)
    __m512 wide = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16)
        wide = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)), _mm512_loadu_ps(c + i), wide);
    sum = _mm512_reduce_add_ps(wide);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)), _mm256_loadu_ps(c + i), acc);
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    sum += _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
#endif
    for (; i < n; ++i) sum += a[i] * b[i] * c[i];
    return sum;
}

// Room a thread needs for one row: its scales per 64-column block, its scales and zeros as float32.
struct RowScratch {
    std::vector<float> block_scales, scales, zeros;
    RowScratch(int64_t blocks, int64_t groups) : block_scales(blocks, 0.f), scales(groups), zeros(groups) {}
};

// The row's scale per 64-column block for columns [c0, c1) (0 on the padding past the last
// group), and, from the first columns (c0 = 0), its zero terms sum_g s z sum x for tokens
// [t0, t0 + NT) taken from y.
template <int NT>
void row_scales(const Problem& p, int64_t row, int64_t t0, int64_t c0, int64_t c1, RowScratch& scratch) {
    const int64_t groups = p.cols / p.group_size, per_group = p.group_size / BLOCK;
    const uint16_t* scale = p.scale + row * groups;
    // with groups of 64 the block scales are the scales; else they are spread over their blocks
    float* scales = per_group == 1 ? scratch.block_scales.data() : scratch.scales.data();
    const int64_t g0 = c0 == 0 ? 0 : c0 / p.group_size;
    const int64_t g1 = c0 == 0 ? groups : std::min(groups, (c1 + p.group_size - 1) / p.group_size);
    halves_to_floats(scale + g0, scales + g0, g1 - g0);
    if (c0 == 0) {
        float* zeros = scratch.zeros.data();
        halves_to_floats(p.zero + row * groups, zeros, groups);
        for (int t = 0; t < NT; ++t)
            p.y[(t0 + t) * p.rows + row] -= triple_dot(scales, zeros, p.x_sums + (t0 + t) * groups, groups);
    }
    if (per_group == 1) return;
    float* block_scales = scratch.block_scales.data();  // zero past cols since it was made
    for (int64_t g = g0; g < g1; ++g)
        for (int64_t i = 0; i < per_group; ++i) block_scales[g * per_group + i] = scales[g];
}

// Adds to y the dot products of row `row` over units [u0, u1) with tokens [t0, t0 + NT):
// the sum over those 64-column blocks of s * (q . x).
template <int BITS, int NT>
void row_dot(const Problem& p, int64_t row, int64_t t0, int64_t u0, int64_t u1, RowScratch& scratch) {
    constexpr int PER_BYTE = 8 / BITS;
    constexpr int MASK = (1 << BITS) - 1;
    constexpr int64_t UNIT_COLS = 32 * PER_BYTE;
    constexpr int BLOCKS = UNIT_COLS / BLOCK;  // per unit: 2 (2-bit) or 1 (4-bit)
    row_scales<NT>(p, row, t0, u0 * UNIT_COLS, u1 * UNIT_COLS, scratch);
    const float* block_scales = scratch.block_scales.data();
    const uint8_t* unit = p.codes + (row * (p.padded_cols / UNIT_COLS) + u0) * 32;
    float total[NT];
    const float* x = p.x + t0 * p.x_stride;
#if defined(__AVX512F__)
    // vpermps reads the low 4 bits of each lane: a table of i & MASK decodes and converts in one step
    const __m512 table = _mm512_setr_ps(0 & MASK, 1 & MASK, 2 & MASK, 3 & MASK, 4 & MASK, 5 & MASK, 6 & MASK, 7 & MASK,
                                        8 & MASK, 9 & MASK, 10 & MASK, 11 & MASK, 12 & MASK, 13 & MASK, 14 & MASK, 15 & MASK);
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t u = u0, col0 = u0 * UNIT_COLS; u < u1; ++u, unit += 32, col0 += UNIT_COLS) {
        __m512 dot[BLOCKS][NT];
        for (int b = 0; b < BLOCKS; ++b)
            for (int t = 0; t < NT; ++t) dot[b][t] = _mm512_setzero_ps();
        for (int half = 0; half < 2; ++half) {
            const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + 16 * half)));
#pragma GCC unroll 4
            for (int j = 0; j < PER_BYTE; ++j) {
                const __m512 q = _mm512_permutexvar_ps(j ? _mm512_srli_epi32(wide, BITS * j) : wide, table);
                const int b = 32 * j / BLOCK;
                for (int t = 0; t < NT; ++t)
                    dot[b][t] = _mm512_fmadd_ps(q, _mm512_loadu_ps(x + t * p.x_stride + col0 + 32 * j + 16 * half), dot[b][t]);
            }
        }
        for (int b = 0; b < BLOCKS; ++b) {
            const __m512 s = _mm512_set1_ps(block_scales[u * BLOCKS + b]);
            for (int t = 0; t < NT; ++t) acc[t] = _mm512_fmadd_ps(s, dot[b][t], acc[t]);
        }
    }
    for (int t = 0; t < NT; ++t) total[t] = _mm512_reduce_add_ps(acc[t]);
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256i mask = _mm256_set1_epi32(MASK);
    const __m256 table = _mm256_setr_ps(0 & MASK, 1 & MASK, 2 & MASK, 3 & MASK, 4 & MASK, 5 & MASK, 6 & MASK, 7 & MASK);
    __m256 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t u = u0, col0 = u0 * UNIT_COLS; u < u1; ++u, unit += 32, col0 += UNIT_COLS) {
        __m256 dot[BLOCKS][NT];
        for (int b = 0; b < BLOCKS; ++b)
            for (int t = 0; t < NT; ++t) dot[b][t] = _mm256_setzero_ps();
        for (int quarter = 0; quarter < 4; ++quarter) {
            const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(unit + 8 * quarter)));
#pragma GCC unroll 4
            for (int j = 0; j < PER_BYTE; ++j) {
                const __m256i shifted = j ? _mm256_srli_epi32(wide, BITS * j) : wide;
                // vpermps reads 3 bits: enough for 2-bit codes; 4-bit ones are masked and converted
                const __m256 q = BITS == 2 ? _mm256_permutevar8x32_ps(table, shifted)
                                           : _mm256_cvtepi32_ps(_mm256_and_si256(shifted, mask));
                const int b = 32 * j / BLOCK;
                for (int t = 0; t < NT; ++t)
                    dot[b][t] = _mm256_fmadd_ps(q, _mm256_loadu_ps(x + t * p.x_stride + col0 + 32 * j + 8 * quarter), dot[b][t]);
            }
        }
        for (int b = 0; b < BLOCKS; ++b) {
            const __m256 s = _mm256_set1_ps(block_scales[u * BLOCKS + b]);
            for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(s, dot[b][t], acc[t]);
        }
    }
    for (int t = 0; t < NT; ++t) {
        const __m128 four = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
        total[t] = _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
    }
#else
    for (int t = 0; t < NT; ++t) total[t] = 0.f;
    for (int64_t u = u0, col0 = u0 * UNIT_COLS; u < u1; ++u, unit += 32, col0 += UNIT_COLS) {
        float dot[BLOCKS][NT] = {};
        for (int w = 0; w < 32; ++w)
            for (int j = 0; j < PER_BYTE; ++j) {
                const float q = static_cast<float>((unit[w] >> (BITS * j)) & MASK);
                for (int t = 0; t < NT; ++t) dot[32 * j / BLOCK][t] += q * x[t * p.x_stride + col0 + 32 * j + w];
            }
        for (int b = 0; b < BLOCKS; ++b)
            for (int t = 0; t < NT; ++t) total[t] += block_scales[u * BLOCKS + b] * dot[b][t];
    }
#endif
    for (int t = 0; t < NT; ++t) p.y[(t0 + t) * p.rows + row] += total[t];
}

#if defined(__AVX512BF16__)
// The same sum for bf16 x, two columns per fp32 lane: vdpbf16ps multiplies 32 bf16 codes by 32 bf16
// x and adds the pairs into 16 fp32 lanes. A code (< 16) and a bf16 x have 4 + 8 significant bits,
// so each product is exact in fp32 and only the order of the fp32 sums differs, as above; with half
// the instructions per code. A unit's 32 bytes widen to 32 words: word w holds columns 32 j + w at
// bit b j, and vpermw (lane i -> table[i], read from the low 5 bits of i) gives the codes of 32
// consecutive columns, paired as x is: a table of bf16(i & mask) for the codes at bits 0 and 4,
// one of bf16(i >> 2 & mask) for 2-bit codes at bits 2 and 6, so that one shift serves two codes.
template <int BITS, int NT, int ROWS>
void row_dot_bf16(const Problem& p, int64_t row, int64_t t0, int64_t u0, int64_t u1, RowScratch* scratch) {
    constexpr int PER_BYTE = 8 / BITS;
    constexpr int MASK = (1 << BITS) - 1;
    constexpr int64_t UNIT_COLS = 32 * PER_BYTE;
    constexpr int BLOCKS = UNIT_COLS / BLOCK;  // per unit: 2 (2-bit) or 1 (4-bit)
    // at one or two tokens of one row the chain acc += s * dot would bound the loop: two, alternating
    constexpr int CHAINS = NT * ROWS <= 2 ? 2 : 1;
    const float* block_scales[ROWS];
    const uint8_t* unit[ROWS];
    for (int r = 0; r < ROWS; ++r) {
        row_scales<NT>(p, row + r, t0, u0 * UNIT_COLS, u1 * UNIT_COLS, scratch[r]);
        block_scales[r] = scratch[r].block_scales.data();
        unit[r] = p.codes + ((row + r) * (p.padded_cols / UNIT_COLS) + u0) * 32;
    }
    const uint16_t* x = p.x_bf16 + t0 * p.x_stride;
    alignas(64) uint16_t words[2][32];
    for (int k = 0; k < 2; ++k)
        for (int i = 0; i < 32; ++i) {
            const float code = static_cast<float>(i >> (2 * k) & MASK);
            uint32_t bits;
            std::memcpy(&bits, &code, 4);
            words[k][i] = static_cast<uint16_t>(bits >> 16);  // exact: a code has 4 significant bits
        }
    const __m512i tables[2] = {_mm512_load_si512(words[0]), _mm512_load_si512(words[1])};
    __m512 acc[CHAINS][ROWS][NT];
    for (int c = 0; c < CHAINS; ++c)
        for (int r = 0; r < ROWS; ++r)
            for (int t = 0; t < NT; ++t) acc[c][r][t] = _mm512_setzero_ps();
    for (int64_t u = u0, col0 = u0 * UNIT_COLS; u < u1; ++u, col0 += UNIT_COLS) {
        __m512i wide[ROWS];
        for (int r = 0; r < ROWS; ++r)
            wide[r] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit[r] + (u - u0) * 32)));
        __m512 dot[ROWS][BLOCKS][NT];
        for (int r = 0; r < ROWS; ++r)
            for (int b = 0; b < BLOCKS; ++b)
                for (int t = 0; t < NT; ++t) dot[r][b][t] = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int j = 0; j < PER_BYTE; ++j) {
            // the code at bit b j: shifted by whole nibbles, the 2 bits past one read by the second table
            const int shift = BITS * j & ~3, table = (BITS * j & 3) / 2;
            const int b = 32 * j / BLOCK;
            __m512bh q[ROWS];
            for (int r = 0; r < ROWS; ++r)
                q[r] = (__m512bh)_mm512_permutexvar_epi16(shift ? _mm512_srli_epi16(wide[r], shift) : wide[r], tables[table]);
            for (int t = 0; t < NT; ++t) {
                const __m512bh xs = (__m512bh)_mm512_loadu_si512(x + t * p.x_stride + col0 + 32 * j);  // one load, every row
                for (int r = 0; r < ROWS; ++r) dot[r][b][t] = _mm512_dpbf16_ps(dot[r][b][t], q[r], xs);
            }
        }
        for (int r = 0; r < ROWS; ++r)
            for (int b = 0; b < BLOCKS; ++b) {
                const int c = CHAINS == 1 ? 0 : BLOCKS == 2 ? b : (u & 1);
                const __m512 s = _mm512_set1_ps(block_scales[r][u * BLOCKS + b]);
                for (int t = 0; t < NT; ++t) acc[c][r][t] = _mm512_fmadd_ps(s, dot[r][b][t], acc[c][r][t]);
            }
    }
    for (int r = 0; r < ROWS; ++r)
        for (int t = 0; t < NT; ++t) {
            __m512 sum = acc[0][r][t];
            for (int c = 1; c < CHAINS; ++c) sum = _mm512_add_ps(sum, acc[c][r][t]);
            p.y[(t0 + t) * p.rows + row + r] += _mm512_reduce_add_ps(sum);
        }
}
#endif

#if defined(__AVX512F__)
constexpr int MAX_TILE = 8;  // tokens per pass over a row: 3 * 8 accumulators of 32 registers
#else
constexpr int MAX_TILE = 4;  // AVX2 has 16 registers
#endif
constexpr int64_t X_TILE_BYTES = 24 * 1024;  // the slice of x a pass over rows reuses: kept in L1

// Rows [r0, r1) for tokens [t0, t0 + NT): a column block at a time, so that the block's slice of
// x stays in L1 while every row of the range reads it (8 tokens of a 14336-wide x are 458 KB).
template <int BITS, int NT>
void rows_tile(const Problem& p, int64_t r0, int64_t r1, int64_t t0, RowScratch* scratch) {
    constexpr int64_t UNIT_COLS = 32 * (8 / BITS);
    const int64_t units = p.padded_cols / UNIT_COLS;
    const int64_t x_bytes = p.x_bf16 ? 2 : 4;
    const int64_t step = std::max<int64_t>(1, X_TILE_BYTES / (x_bytes * NT * UNIT_COLS));
    for (int64_t u0 = 0; u0 < units; u0 += step) {
        const int64_t u1 = std::min(units, u0 + step);
#if defined(__AVX512BF16__)
        if (p.x_bf16) {
            // two rows at a time share each load of x: faster at 3 and 4 tokens (past 4, too few
            // registers; at one and two tokens, slower on a Zen 4)
            constexpr int ROWS = NT >= 3 && NT <= 4 ? 2 : 1;
            int64_t row = r0;
            for (; row + ROWS <= r1; row += ROWS) row_dot_bf16<BITS, NT, ROWS>(p, row, t0, u0, u1, scratch);
            for (; row < r1; ++row) row_dot_bf16<BITS, NT, 1>(p, row, t0, u0, u1, scratch);
            continue;
        }
#endif
        for (int64_t row = r0; row < r1; ++row) row_dot<BITS, NT>(p, row, t0, u0, u1, scratch[0]);
    }
}

template <int BITS>
void rows_all_tokens(const Problem& p, int64_t r0, int64_t r1, RowScratch* scratch) {
    for (int64_t t0 = 0; t0 < p.tokens; t0 += MAX_TILE) {
        switch (std::min<int64_t>(p.tokens - t0, MAX_TILE)) {
            case 1: rows_tile<BITS, 1>(p, r0, r1, t0, scratch); break;
            case 2: rows_tile<BITS, 2>(p, r0, r1, t0, scratch); break;
            case 3: rows_tile<BITS, 3>(p, r0, r1, t0, scratch); break;
            case 4: rows_tile<BITS, 4>(p, r0, r1, t0, scratch); break;
#if defined(__AVX512F__)
            case 5: rows_tile<BITS, 5>(p, r0, r1, t0, scratch); break;
            case 6: rows_tile<BITS, 6>(p, r0, r1, t0, scratch); break;
            case 7: rows_tile<BITS, 7>(p, r0, r1, t0, scratch); break;
            case 8: rows_tile<BITS, 8>(p, r0, r1, t0, scratch); break;
#endif
        }
    }
}

}  // namespace

extern "C" {

// What the build chose, for the log: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (scalar).
int hqq_vector_bits() {
#if defined(__AVX512F__)
    int bits = 512;
#elif defined(__AVX2__) && defined(__FMA__)
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

// x is [T, cols], fp32 (x_is_bf16 = 0) or bf16 (1); y is [T, rows] fp32. Returns 0, or -1 for a
// shape the layout cannot hold (the caller checks these first).
int hqq_matmul(const uint8_t* codes, const uint16_t* scale, const uint16_t* zero, int bits, int64_t group_size,
               int64_t rows, int64_t cols, const void* x, int x_is_bf16, int64_t tokens, float* y, int threads) {
    if ((bits != 2 && bits != 4) || group_size <= 0 || cols % group_size || group_size % BLOCK) return -1;
    const int64_t unit_cols = 32 * (8 / bits);
    const int64_t padded_cols = (cols + unit_cols - 1) / unit_cols * unit_cols;
    const int64_t groups = cols / group_size;
    // x padded with zeros to whole units: bf16 as given where the build has AVX512-BF16, else fp32
    const int64_t x_stride = padded_cols + 32;
#if defined(__AVX512BF16__)
    const bool keep_bf16 = x_is_bf16;
#else
    const bool keep_bf16 = false;
#endif
    std::vector<float> x32(keep_bf16 ? 0 : tokens * x_stride, 0.f), x_sums(tokens * groups);
    std::vector<uint16_t> x16(keep_bf16 ? tokens * x_stride + 32 : 0, 0);
    // 64-byte aligned, so that a load of 32 bf16 columns is one cache line
    uint16_t* xb = keep_bf16 ? x16.data() + (64 - reinterpret_cast<uintptr_t>(x16.data()) % 64) % 64 / 2 : nullptr;
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t g = 0; g < groups; ++g) {
            float sum = 0.f;
            for (int64_t i = g * group_size; i < (g + 1) * group_size; ++i) {
                const float value = x_is_bf16 ? bf16_to_float(static_cast<const uint16_t*>(x)[t * cols + i])
                                              : static_cast<const float*>(x)[t * cols + i];
                if (keep_bf16) xb[t * x_stride + i] = static_cast<const uint16_t*>(x)[t * cols + i];
                else x32[t * x_stride + i] = value;
                sum += value;
            }
            x_sums[t * groups + g] = sum;
        }
    const Problem p{codes, scale, zero, group_size, rows, cols, padded_cols, tokens, keep_bf16 ? nullptr : x32.data(), xb,
                    x_stride, x_sums.data(), y};
    std::memset(y, 0, sizeof(float) * tokens * rows);
#pragma omp parallel num_threads(threads)
    {
        // each thread a contiguous range of rows, in blocks of 16 rows
        const int64_t count = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t blocks = (rows + 15) / 16;
        const int64_t r0 = std::min(rows, blocks * id / count * 16), r1 = std::min(rows, blocks * (id + 1) / count * 16);
        RowScratch scratch[2] = {RowScratch(padded_cols / BLOCK, groups), RowScratch(padded_cols / BLOCK, groups)};
        if (bits == 2) rows_all_tokens<2>(p, r0, r1, scratch);
        else rows_all_tokens<4>(p, r0, r1, scratch);
    }
    return 0;
}

}  // extern "C"
