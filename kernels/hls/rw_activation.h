// Elementwise activations are generated inline by the exporter (rw::lookup tables for GELU, SiLU,
// tanh, sigmoid, ELU: N+1 points, linear interpolation, exact asymptotes outside the range).
// This header keeps the standalone forms for hand-written designs.
#ifndef RW_ACTIVATION_H
#define RW_ACTIVATION_H

#include "rw_common.h"

namespace rw {

template <class IN_T, class OUT_T, class TABLE_T, int SIZE, int N>
void tabulated(const IN_T x[SIZE], OUT_T y[SIZE], const int32_t table[N + 1], float lo, float hi,
               int below, int above) {
    RW_ACT:
    for (int i = 0; i < SIZE; i++) {
        #pragma HLS PIPELINE
        y[i] = OUT_T(lookup<IN_T, TABLE_T, N>(x[i], table, lo, hi, below, above));
    }
}

// Residual add of two equal-shape tensors (the transformer's skip connections).
template <class A_T, class B_T, class OUT_T, int SIZE>
void add(const A_T a[SIZE], const B_T b[SIZE], OUT_T y[SIZE]) {
    RW_ADD:
    for (int i = 0; i < SIZE; i++) {
        #pragma HLS PIPELINE
        y[i] = OUT_T(a[i] + b[i]);
    }
}

template <class IN_T, class OUT_T, int SIZE>
void relu(const IN_T x[SIZE], OUT_T y[SIZE]) {
    RW_RELU:
    for (int i = 0; i < SIZE; i++) {
        #pragma HLS UNROLL
        y[i] = x[i] > 0 ? OUT_T(x[i]) : OUT_T(0);
    }
}

}  // namespace rw

#endif
