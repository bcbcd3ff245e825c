// Normalizations over the last dim, one row at a time. LayerNorm and the RMS norms need one
// reciprocal square root per row (rw::rsqrt: shifts and a few multiplies, no sqrt unit); the L1
// norm needs one reciprocal per row and no square at all, the reason it suits FPGAs.
#ifndef RW_NORM_H
#define RW_NORM_H

#include "rw_common.h"

namespace rw {

// y = (x - mean) / sqrt(var + eps) * w + b
template <class IN_T, class OUT_T, class W_T, class ACC_T, int ROWS, int N, bool HAS_W, bool HAS_B>
void layer_norm(const IN_T x[ROWS * N], OUT_T y[ROWS * N], const int32_t w[N], const int32_t b[N],
                float eps) {
    RW_LN_ROWS:
    for (int t = 0; t < ROWS; t++) {
        ACC_T sum = 0;
        RW_LN_MEAN:
        for (int i = 0; i < N; i++) sum += x[t * N + i];
        ACC_T mean = sum / N;
        ACC_T squares = 0;
        RW_LN_VAR:
        for (int i = 0; i < N; i++) {
            ACC_T d = ACC_T(x[t * N + i]) - mean;
            squares += d * d;
        }
        ACC_T scale = rsqrt<ACC_T, ACC_T>(ACC_T(squares / N) + ACC_T(eps));
        RW_LN_OUT:
        for (int i = 0; i < N; i++) {
            ACC_T v = (ACC_T(x[t * N + i]) - mean) * scale;
            if (HAS_W) v = v * ACC_T(from_bits<W_T>(w[i]));
            if (HAS_B) v = v + ACC_T(from_bits<W_T>(b[i]));
            y[t * N + i] = OUT_T(v);
        }
    }
}

// RMSNorm, optional weight and bias: y = x / sqrt(mean(x^2) + eps) * w + b.
// CRMSNorm (IMPLIED): the row is the first N entries of a zero-mean (N+1)-vector, whose last
// entry -sum(x) enters the mean square; no weight or bias (they are folded into the next layer).
template <class IN_T, class OUT_T, class W_T, class ACC_T, int ROWS, int N, bool HAS_W, bool HAS_B,
          bool IMPLIED>
void rms_norm(const IN_T x[ROWS * N], OUT_T y[ROWS * N], const int32_t w[N], const int32_t b[N],
              float eps) {
    RW_RMS_ROWS:
    for (int t = 0; t < ROWS; t++) {
        ACC_T squares = 0;
        ACC_T sum = 0;
        RW_RMS_SQUARES:
        for (int i = 0; i < N; i++) {
            ACC_T v = x[t * N + i];
            squares += v * v;
            sum += v;
        }
        if (IMPLIED) squares += sum * sum;
        ACC_T scale = rsqrt<ACC_T, ACC_T>(ACC_T(squares / (IMPLIED ? N + 1 : N)) + ACC_T(eps));
        RW_RMS_OUT:
        for (int i = 0; i < N; i++) {
            ACC_T v = ACC_T(x[t * N + i]) * scale;
            if (HAS_W) v = v * ACC_T(from_bits<W_T>(w[i]));
            if (HAS_B) v = v + ACC_T(from_bits<W_T>(b[i]));
            y[t * N + i] = OUT_T(v);
        }
    }
}

// L1 norm: d = x - mean(x) (CENTERED) or x; y = d / (factor mean|d| + eps) * w + b.
template <class IN_T, class OUT_T, class W_T, class ACC_T, int ROWS, int N, bool HAS_W, bool HAS_B,
          bool CENTERED>
void l1_norm(const IN_T x[ROWS * N], OUT_T y[ROWS * N], const int32_t w[N], const int32_t b[N], float eps,
             float factor) {
    RW_L1_ROWS:
    for (int t = 0; t < ROWS; t++) {
        ACC_T mean = 0;
        if (CENTERED) {
            ACC_T sum = 0;
            RW_L1_MEAN:
            for (int i = 0; i < N; i++) sum += x[t * N + i];
            mean = sum / N;
        }
        ACC_T deviation = 0;
        RW_L1_ABS:
        for (int i = 0; i < N; i++) {
            ACC_T d = ACC_T(x[t * N + i]) - mean;
            deviation += d < 0 ? ACC_T(-d) : d;
        }
        ACC_T scale = ACC_T(1) / (ACC_T(factor) * ACC_T(deviation / N) + ACC_T(eps));
        RW_L1_OUT:
        for (int i = 0; i < N; i++) {
            ACC_T v = (ACC_T(x[t * N + i]) - mean) * scale;
            if (HAS_W) v = v * ACC_T(from_bits<W_T>(w[i]));
            if (HAS_B) v = v + ACC_T(from_bits<W_T>(b[i]));
            y[t * N + i] = OUT_T(v);
        }
    }
}

}  // namespace rw

#endif
