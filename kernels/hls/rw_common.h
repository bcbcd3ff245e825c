// rewriter HLS kernels: common helpers. C++ templates for Vitis HLS; compiled by g++ against the
// ap_types headers for C simulation. Every function takes plain arrays of fixed-point types and
// compile-time sizes; accumulation types are template parameters chosen by the exporter.
#ifndef RW_COMMON_H
#define RW_COMMON_H

#include "ap_fixed.h"
#include "ap_int.h"
#include <stdint.h>

namespace rw {

// A fixed-point value from its raw bit pattern (weights are stored as integers: fast to compile).
template <class T, class B>
inline T from_bits(B bits) {
    T value;
    value.range() = bits;
    return value;
}

// Multiply by 2^e with shifts only (e may be negative): the power-of-two scales of ShiftQuant.
template <class T>
inline T shift_pow2(T x, int e) {
    return e >= 0 ? T(x << e) : T(x >> (-e));
}

// 1 / sqrt(x) for x > 0 without a square root unit: scale x into [0.5, 2) by a power of four
// (shifts), seed with a linear fit, three Newton steps y <- y (3 - m y^2) / 2 in 32-bit fixed
// point (relative error < 1e-6), then scale back by the matching power of two.
template <class IN_T, class OUT_T>
OUT_T rsqrt(IN_T x) {
    typedef ap_ufixed<40, 8> m_t;
    typedef ap_ufixed<32, 4> y_t;
    if (x <= 0) return OUT_T(0);
    // x = m * 4^k with m in [0.5, 2)
    ap_ufixed<72, 36> v = x;
    int k = 0;
    RW_RSQRT_UP:
    for (int i = 0; i < 32; i++) {
        if (v >= 2) {
            v >>= 2;
            k++;
        }
    }
    RW_RSQRT_DOWN:
    for (int i = 0; i < 32; i++) {
        if (v < ap_ufixed<4, 1>(0.5)) {
            v <<= 2;
            k--;
        }
    }
    m_t m = v;
    y_t y = y_t(1.45) - y_t(0.5) * m;  // near 1/sqrt(m) on [0.5, 2)
    RW_RSQRT_NEWTON:
    for (int i = 0; i < 3; i++) {
        ap_ufixed<48, 8> yy = y * y;
        ap_fixed<48, 8> t = ap_fixed<48, 8>(3) - m * yy;
        y = y * t / 2;
    }
    // 1/sqrt(m 4^k) = y 2^-k
    ap_ufixed<64, 32> r = y;
    if (k >= 0) {
        r >>= k;
    } else {
        r <<= -k;
    }
    return OUT_T(r);
}

// A function tabulated in N+1 points on [lo, hi] (raw bits of TABLE_T, written by the exporter),
// linearly interpolated. Outside the range: BELOW / ABOVE select 0, -1, +1 or the identity (2).
template <class X_T, class TABLE_T, int N>
X_T lookup(X_T x, const int32_t table[N + 1], float lo, float hi, int below, int above) {
    if (x < X_T(lo)) return below == 2 ? x : X_T(below);
    if (x >= X_T(hi)) return above == 2 ? x : X_T(above);
    typedef ap_fixed<48, 20> pos_t;
    const pos_t step_inv = pos_t((float)N / (hi - lo));
    pos_t position = (pos_t(x) - pos_t(lo)) * step_inv;
    int index = position.to_int();
    if (index < 0) index = 0;
    if (index >= N) index = N - 1;
    ap_ufixed<24, 1> frac = position - pos_t(index);
    ap_fixed<48, 20> a = from_bits<TABLE_T>(table[index]);
    ap_fixed<48, 20> b = from_bits<TABLE_T>(table[index + 1]);
    return X_T(a + (b - a) * frac);
}

}  // namespace rw

#endif
