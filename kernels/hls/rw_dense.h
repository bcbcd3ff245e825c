// Dense layers and matrix products, row by row: y[t] = x[t] W^T + b for each of ROWS rows.
// REUSE (the reuse factor) is how many multiplications share one multiplier: the inner loop is
// unrolled by N_IN / REUSE. The exporter sizes accumulators (ACC_T) from the precisions.
#ifndef RW_DENSE_H
#define RW_DENSE_H

#include "rw_common.h"

namespace rw {

template <class IN_T, class OUT_T, class W_T, class B_T, class ACC_T, int ROWS, int N_IN, int N_OUT,
          int REUSE, bool HAS_BIAS>
void dense(const IN_T x[ROWS * N_IN], OUT_T y[ROWS * N_OUT], const int32_t w[N_OUT * N_IN],
           const int32_t b[N_OUT]) {
    RW_DENSE_ROWS:
    for (int t = 0; t < ROWS; t++) {
        RW_DENSE_OUT:
        for (int o = 0; o < N_OUT; o++) {
            #pragma HLS PIPELINE II = REUSE
            ACC_T acc = HAS_BIAS ? ACC_T(from_bits<B_T>(b[o])) : ACC_T(0);
            RW_DENSE_IN:
            for (int i = 0; i < N_IN; i++) {
                #pragma HLS UNROLL factor = N_IN / REUSE
                acc += ACC_T(x[t * N_IN + i]) * ACC_T(from_bits<W_T>(w[o * N_IN + i]));
            }
            y[t * N_OUT + o] = OUT_T(acc);
        }
    }
}

// ShiftQuant dense: weights are BITS-bit codes packed little-endian in bytes (the op's storage
// format), one power-of-two exponent per group of GROUP inputs. Each group's products are
// BITS-bit integer times activation (narrow multipliers, or adders for 2 bits); the group sum is
// scaled by 2^e with a shift, never a multiplier.
template <class IN_T, class OUT_T, class B_T, class ACC_T, int ROWS, int N_IN, int N_OUT, int BITS,
          int GROUP, int GROUPS, int REUSE, bool HAS_BIAS>
void shiftquant_dense(const IN_T x[ROWS * N_IN], OUT_T y[ROWS * N_OUT],
                      const uint8_t packed[N_OUT * GROUPS * (GROUP * BITS / 8)],
                      const int8_t exponents[N_OUT * GROUPS], const int32_t b[N_OUT]) {
    const int GROUP_BYTES = GROUP * BITS / 8;
    const int OFFSET = 1 << (BITS - 1);
    RW_SQ_ROWS:
    for (int t = 0; t < ROWS; t++) {
        RW_SQ_OUT:
        for (int o = 0; o < N_OUT; o++) {
            #pragma HLS PIPELINE II = REUSE
            ACC_T acc = HAS_BIAS ? ACC_T(from_bits<B_T>(b[o])) : ACC_T(0);
            RW_SQ_GROUPS:
            for (int g = 0; g < GROUPS; g++) {
                ACC_T partial = 0;
                RW_SQ_CODES:
                for (int i = 0; i < GROUP; i++) {
                    int k = g * GROUP + i;
                    if (k >= N_IN) break;
                    int bit = i * BITS;
                    int index = (o * GROUPS + g) * GROUP_BYTES + bit / 8;
                    ap_uint<16> word = packed[index];
                    if ((bit % 8) + BITS > 8 && bit / 8 + 1 < GROUP_BYTES) {
                        word |= ap_uint<16>(packed[index + 1]) << 8;
                    }
                    ap_int<BITS + 1> q = ap_int<BITS + 1>((word >> (bit % 8)) & ((1 << BITS) - 1)) - OFFSET;
                    partial += ACC_T(x[t * N_IN + k]) * q;
                }
                acc += shift_pow2<ACC_T>(partial, int(exponents[o * GROUPS + g]));
            }
            y[t * N_OUT + o] = OUT_T(acc);
        }
    }
}

// Batched product of two activations: c[b] = a[b] (M x K) times bm[b] (K x N), row-major.
template <class A_T, class B_T, class OUT_T, class ACC_T, int BATCH, int M, int K, int N>
void matmul(const A_T a[BATCH * M * K], const B_T bm[BATCH * K * N], OUT_T c[BATCH * M * N]) {
    RW_MM_BATCH:
    for (int p = 0; p < BATCH; p++) {
        RW_MM_ROWS:
        for (int i = 0; i < M; i++) {
            RW_MM_COLS:
            for (int j = 0; j < N; j++) {
                #pragma HLS PIPELINE
                ACC_T acc = 0;
                RW_MM_INNER:
                for (int k = 0; k < K; k++) {
                    acc += ACC_T(a[(p * M + i) * K + k]) * ACC_T(bm[(p * K + k) * N + j]);
                }
                c[(p * M + i) * N + j] = OUT_T(acc);
            }
        }
    }
}

}  // namespace rw

#endif
