// Attention for small sequence lengths (the whole T x T score matrix per head on chip), and
// linear attention in its recurrent streaming form (a fixed-size state per head in on-chip
// memory, one token at a time: what an FPGA streams).
#ifndef RW_ATTENTION_H
#define RW_ATTENTION_H

#include "rw_common.h"

namespace rw {

// Softmax attention, q/k/v [HEADS, T, D] (batch folded into heads), additive mask [T, S] or none,
// causal optional. exp uses a table on [-16, 0] (scores are shifted by their row maximum).
template <class Q_T, class OUT_T, class ACC_T, class TABLE_T, int HEADS, int T, int S, int D,
          int N_EXP, bool CAUSAL>
void softmax_attention(const Q_T q[HEADS * T * D], const Q_T k[HEADS * S * D],
                       const Q_T v[HEADS * S * D], OUT_T out[HEADS * T * D],
                       const int32_t exp_table[N_EXP + 1], float scale) {
    RW_ATT_HEADS:
    for (int h = 0; h < HEADS; h++) {
        RW_ATT_ROWS:
        for (int t = 0; t < T; t++) {
            ACC_T scores[S];
            ACC_T top = -1024;
            RW_ATT_SCORES:
            for (int s = 0; s < S; s++) {
                ACC_T dot = 0;
                for (int d = 0; d < D; d++) dot += ACC_T(q[(h * T + t) * D + d]) * ACC_T(k[(h * S + s) * D + d]);
                scores[s] = dot * ACC_T(scale);
                bool visible = !CAUSAL || s <= t + (S - T);
                if (visible && scores[s] > top) top = scores[s];
            }
            ACC_T weights[S];
            ACC_T total = 0;
            RW_ATT_EXP:
            for (int s = 0; s < S; s++) {
                bool visible = !CAUSAL || s <= t + (S - T);
                ACC_T shifted = scores[s] - top;
                ACC_T e = 0;
                if (visible) e = lookup<ACC_T, TABLE_T, N_EXP>(shifted, exp_table, -16.0f, 0.0f, 0, 1);
                weights[s] = e;
                total += e;
            }
            ACC_T inverse = ACC_T(1) / total;
            RW_ATT_OUT:
            for (int d = 0; d < D; d++) {
                ACC_T acc = 0;
                for (int s = 0; s < S; s++) acc += weights[s] * ACC_T(v[(h * S + s) * D + d]);
                out[(h * T + t) * D + d] = OUT_T(acc * inverse);
            }
        }
    }
}

// Row softmax over the last dim (exp table on [-16, 0] after subtracting the row maximum).
template <class IN_T, class OUT_T, class ACC_T, class TABLE_T, int ROWS, int N, int N_EXP>
void softmax(const IN_T x[ROWS * N], OUT_T y[ROWS * N], const int32_t exp_table[N_EXP + 1]) {
    RW_SOFTMAX_ROWS:
    for (int t = 0; t < ROWS; t++) {
        ACC_T top = x[t * N];
        for (int i = 1; i < N; i++) {
            if (ACC_T(x[t * N + i]) > top) top = x[t * N + i];
        }
        ACC_T weights[N];
        ACC_T total = 0;
        for (int i = 0; i < N; i++) {
            weights[i] = lookup<ACC_T, TABLE_T, N_EXP>(ACC_T(x[t * N + i]) - top, exp_table, -16.0f, 0.0f, 0, 1);
            total += weights[i];
        }
        ACC_T inverse = ACC_T(1) / total;
        for (int i = 0; i < N; i++) y[t * N + i] = OUT_T(weights[i] * inverse);
    }
}

// Causal linear attention, recurrent: per head a state S[F][D] and normalizer z[F] kept on chip;
// token t: S <- gamma S + phi_k v^T, z <- gamma z + phi_k, y = phi_q S / (phi_q z + eps).
// Feature maps are computed before (inputs [HEADS, T, F]); gamma per head (1: no decay).
template <class IN_T, class OUT_T, class STATE_T, class ACC_T, int HEADS, int T, int F, int D>
void linear_attention(const IN_T phi_q[HEADS * T * F], const IN_T phi_k[HEADS * T * F],
                      const IN_T v[HEADS * T * D], OUT_T out[HEADS * T * D],
                      const float gamma[HEADS], const bool key_valid[T], float eps) {
    RW_LIN_HEADS:
    for (int h = 0; h < HEADS; h++) {
        STATE_T state[F][D];
        STATE_T z[F];
        #pragma HLS ARRAY_PARTITION variable = state complete dim = 2
        RW_LIN_CLEAR:
        for (int f = 0; f < F; f++) {
            z[f] = 0;
            for (int d = 0; d < D; d++) state[f][d] = 0;
        }
        const STATE_T g = gamma[h];
        RW_LIN_TOKENS:
        for (int t = 0; t < T; t++) {
            RW_LIN_UPDATE:
            for (int f = 0; f < F; f++) {
                #pragma HLS PIPELINE
                STATE_T key = key_valid[t] ? STATE_T(phi_k[(h * T + t) * F + f]) : STATE_T(0);
                z[f] = g * z[f] + key;
                for (int d = 0; d < D; d++) {
                    state[f][d] = g * state[f][d] + key * STATE_T(v[(h * T + t) * D + d]);
                }
            }
            ACC_T den = 0;
            RW_LIN_DEN:
            for (int f = 0; f < F; f++) den += ACC_T(phi_q[(h * T + t) * F + f]) * ACC_T(z[f]);
            ACC_T inverse = ACC_T(1) / (den + ACC_T(eps));
            RW_LIN_OUT:
            for (int d = 0; d < D; d++) {
                ACC_T num = 0;
                for (int f = 0; f < F; f++) num += ACC_T(phi_q[(h * T + t) * F + f]) * ACC_T(state[f][d]);
                out[(h * T + t) * D + d] = OUT_T(num * inverse);
            }
        }
    }
}

// Embedding lookup: rows of a table by token id.
template <class ID_T, class OUT_T, class W_T, int ROWS, int VOCAB, int N>
void embedding(const ID_T ids[ROWS], OUT_T y[ROWS * N], const int32_t table[VOCAB * N]) {
    RW_EMB:
    for (int t = 0; t < ROWS; t++) {
        int id = ids[t];
        for (int i = 0; i < N; i++) y[t * N + i] = OUT_T(from_bits<W_T>(table[id * N + i]));
    }
}

}  // namespace rw

#endif
