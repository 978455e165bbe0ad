// Flash-tiled attention on the CPU: a forward that saves the row log-sum-exp, and a k-tangent JVP that recomputes
// the probabilities exactly per [BM, BN] tile from it. Kernels flash_fwd -> op fastjac::flash_fwd, flash_jvp_k ->
// op fastjac::flash_jvp. The algebra is in fastjac/ops/attention/README.md ("C++ flash kernels").
//
//   s_ij = scale q_i.k_j + bias_ij (-inf when masked),  lse_i = log sum_j exp(s_ij),  p_ij = exp(s_ij - lse_i)
//   odot_ti = sum_j p_ij vdot_tj + scale [ sum_j W_tij v_j - (sum_j W_tij) o_i ],
//   W_tij = p_ij (qdot_ti.k_j + q_i.kdot_tj)
//
// Per task (batch, head, block of BM query rows) the working set is one [BM, BN] tile of s/p, one [BM, K, BN] tile
// of W and the [BM, K, Ev] accumulators, whatever S is: nothing of size L x S is allocated. All K tangents share
// each recomputed tile of p; the five tile products are BLAS GEMMs, the exp a vectorised polynomial. Causal
// (top-left aligned: key j allowed iff j <= i) skips the tiles above the diagonal.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

namespace fastjac {

namespace {

struct Bias {
  const void* ptr = nullptr;  // [B, H, L, S] through strides (zero strides for broadcast dimensions)
  int64_t sb = 0, sh = 0, sl = 0, ss = 0;
};

// Tile sizes: an explicit value (> 0) wins; else the [BM, K, BN] tile of W stays near 256 KB (L2 of one core).
inline void pick_tiles(int64_t L, int64_t S, int64_t K, int64_t elem, int64_t bm_req, int64_t bn_req, int64_t& BM,
                       int64_t& BN) {
  BN = bn_req > 0 ? bn_req : 64;
  if (bm_req > 0) {
    BM = bm_req;
  } else {
    BM = (256 * 1024) / std::max<int64_t>(1, K * BN * elem);
    BM = std::max<int64_t>(16, std::min<int64_t>(128, BM / 8 * 8));
  }
  BM = std::max<int64_t>(1, std::min(BM, std::max<int64_t>(1, L)));
  BN = std::max<int64_t>(1, std::min(BN, std::max<int64_t>(1, S)));
}

// s[i, j] (ld BN) = scale q_blk k_tile^T + bias, -inf where masked; then, with lse given, p = exp(s - lse_i)
template <typename T>
inline void scores(const T* qb, const T* kt, int64_t ni, int64_t nj, int64_t E, T scale, const Bias& bias,
                   int64_t b, int64_t h, int64_t i0, int64_t j0, bool causal, T* s, int64_t BN) {
  gemm<T>(ni, nj, E, scale, qb, E, kt, E, /*trans_b=*/true, T(0), s, BN);
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < ni; ++i) {
    T* si = s + i * BN;
    if (bias.ptr) {
      const T* bi = (const T*)bias.ptr + b * bias.sb + h * bias.sh + (i0 + i) * bias.sl + j0 * bias.ss;
      if (bias.ss == 1) {
#pragma omp simd
        for (int64_t j = 0; j < nj; ++j) si[j] += bi[j];
      } else {
        for (int64_t j = 0; j < nj; ++j) si[j] += bi[j * bias.ss];
      }
    }
    if (causal) {
      for (int64_t j = std::max<int64_t>(0, i0 + i + 1 - j0); j < nj; ++j) si[j] = ninf;
    }
  }
}

template <typename T>
void flash_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, double scale_d, bool causal,
               const Bias& bias, int64_t bm_req, int64_t bn_req, at::Tensor& o_, at::Tensor& lse_) {
  const int64_t B = q_.size(0), H = q_.size(1), L = q_.size(2), E = q_.size(3), S = k_.size(2), Ev = v_.size(3);
  const T scale = (T)scale_d;
  const T* q = q_.data_ptr<T>();
  const T* k = k_.data_ptr<T>();
  const T* v = v_.data_ptr<T>();
  T* o = o_.data_ptr<T>();
  T* lse = lse_.data_ptr<T>();
  int64_t BM, BN;
  pick_tiles(L, S, 1, sizeof(T), bm_req, bn_req, BM, BN);
  const int64_t nblk = (L + BM - 1) / BM;
  const auto opt = q_.options();
  at::parallel_for(0, B * H * nblk, 1, [&](int64_t lo, int64_t hi) {
    at::Tensor scratch = at::empty({BM * BN + BM * Ev + 2 * BM}, opt);
    T* s = scratch.data_ptr<T>();  // [BM, BN]
    T* acc = s + BM * BN;          // [BM, Ev]
    T* mx = acc + BM * Ev;         // [BM] running max
    T* l = mx + BM;                // [BM] running sum
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t x = lo; x < hi; ++x) {
      const int64_t bh = x / nblk, blk = x % nblk, b = bh / H, h = bh % H;
      const int64_t i0 = blk * BM, ni = std::min(L, i0 + BM) - i0;
      const T* qb = q + (bh * L + i0) * E;
      const T* kb = k + bh * S * E;
      const T* vb = v + bh * S * Ev;
      std::fill(acc, acc + ni * Ev, T(0));
      std::fill(mx, mx + ni, ninf);
      std::fill(l, l + ni, T(0));
      const int64_t jend = causal ? std::min(S, i0 + ni) : S;  // keys j > i0 + ni - 1 are masked for every row
      for (int64_t j0 = 0; j0 < jend; j0 += BN) {
        const int64_t nj = std::min(BN, S - j0);
        scores<T>(qb, kb + j0 * E, ni, nj, E, scale, bias, b, h, i0, j0, causal, s, BN);
        for (int64_t i = 0; i < ni; ++i) {
          T* si = s + i * BN;
          T m = mx[i];
#pragma omp simd reduction(max : m)
          for (int64_t j = 0; j < nj; ++j) m = si[j] > m ? si[j] : m;
          if (m == ninf) {  // every key so far masked: nothing to add (p = 0), keep the state
            std::fill(si, si + nj, T(0));
            continue;
          }
          const T alpha = exp_simd(mx[i] - m);  // 0 while mx[i] = -inf
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < nj; ++j) {
            const T p = exp_simd(si[j] - m);
            si[j] = p;
            sum += p;
          }
          l[i] = l[i] * alpha + sum;
          mx[i] = m;
          if (alpha != T(1)) {
            T* ai = acc + i * Ev;
#pragma omp simd
            for (int64_t c = 0; c < Ev; ++c) ai[c] *= alpha;
          }
        }
        gemm<T>(ni, Ev, nj, T(1), s, BN, vb + j0 * Ev, Ev, false, T(1), acc, Ev);
      }
      for (int64_t i = 0; i < ni; ++i) {
        T* oi = o + (bh * L + i0 + i) * Ev;
        const T* ai = acc + i * Ev;
        const T li = l[i];
        if (li != T(0)) {  // also NaN (overflowed logits): it must reach o, never look like a masked row
          const T inv = T(1) / li;
#pragma omp simd
          for (int64_t c = 0; c < Ev; ++c) oi[c] = ai[c] * inv;
          lse[bh * L + i0 + i] = mx[i] + std::log(li);
        } else {  // a fully masked row: o = 0, lse = -inf (the JVP then gives 0 too)
          std::fill(oi, oi + Ev, T(0));
          lse[bh * L + i0 + i] = ninf;
        }
      }
    }
  });
}

template <typename T>
void flash_jvp_k(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& o_,
                 const at::Tensor& lse_, const at::Tensor& qd, const at::Tensor& kd, const at::Tensor& vd,
                 double scale_d, bool causal, const Bias& bias, int64_t bm_req, int64_t bn_req, at::Tensor& od_) {
  const int64_t B = q_.size(0), H = q_.size(1), L = q_.size(2), E = q_.size(3), S = k_.size(2), Ev = v_.size(3);
  const int64_t K = qd.size(0);
  const T scale = (T)scale_d;
  const T* q = q_.data_ptr<T>();
  const T* k = k_.data_ptr<T>();
  const T* v = v_.data_ptr<T>();
  const T* o = o_.data_ptr<T>();
  const T* lse = lse_.data_ptr<T>();
  const T* Qd = qd.data_ptr<T>();
  const T* Kd = kd.data_ptr<T>();
  const T* Vd = vd.data_ptr<T>();
  T* Od = od_.data_ptr<T>();  // [K, B, L, H, Ev] contiguous (token-major)
  int64_t BM, BN;
  pick_tiles(L, S, K, sizeof(T), bm_req, bn_req, BM, BN);
  const int64_t nbj = (S + BN - 1) / BN, nblk = (L + BM - 1) / BM;
  const auto opt = q_.options();

  // pack the key-side tangents once per (b, h), tile by tile: kdot as [nbj][K][BN][E] (one GEMM operand per tile
  // for all tangents) and vdot as [nbj][BN][K][Ev]; the tail tile is zero-padded. O(K S E): the inputs' size.
  at::Tensor kdp_ = at::zeros({B * H * nbj * K * BN * E}, opt), vdp_ = at::zeros({B * H * nbj * BN * K * Ev}, opt);
  T* kdp = kdp_.data_ptr<T>();
  T* vdp = vdp_.data_ptr<T>();
  at::parallel_for(0, B * H * K, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t x = lo; x < hi; ++x) {
      const int64_t bh = x / K, t = x % K, b = bh / H, h = bh % H;
      for (int64_t j = 0; j < S; ++j) {
        const int64_t tile = j / BN, jj = j % BN;
        const T* ks = Kd + t * kd.stride(0) + b * kd.stride(1) + h * kd.stride(2) + j * kd.stride(3);
        const T* vs = Vd + t * vd.stride(0) + b * vd.stride(1) + h * vd.stride(2) + j * vd.stride(3);
        T* kp = kdp + (((bh * nbj + tile) * K + t) * BN + jj) * E;
        T* vp = vdp + (((bh * nbj + tile) * BN + jj) * K + t) * Ev;
        for (int64_t e = 0; e < E; ++e) kp[e] = ks[e * kd.stride(4)];
        for (int64_t c = 0; c < Ev; ++c) vp[c] = vs[c * vd.stride(4)];
      }
    }
  });

  at::parallel_for(0, B * H * nblk, 1, [&](int64_t lo, int64_t hi) {
    at::Tensor scratch = at::empty({BM * BN + BM * K * BN + BM * K * Ev + BM * K + BM * K * E}, opt);
    T* p = scratch.data_ptr<T>();  // [BM, BN]
    T* W = p + BM * BN;            // [BM, K, BN]
    T* Y = W + BM * K * BN;        // [BM, K, Ev]
    T* r = Y + BM * K * Ev;        // [BM, K]
    T* Qp = r + BM * K;            // [BM, K, E]: qdot of the block, rows (i, t)
    for (int64_t x = lo; x < hi; ++x) {
      const int64_t bh = x / nblk, blk = x % nblk, b = bh / H, h = bh % H;
      const int64_t i0 = blk * BM, ni = std::min(L, i0 + BM) - i0;
      const T* qb = q + (bh * L + i0) * E;
      const T* kb = k + bh * S * E;
      const T* vb = v + bh * S * Ev;
      const T* lb = lse + bh * L + i0;
      for (int64_t i = 0; i < ni; ++i)
        for (int64_t t = 0; t < K; ++t) {
          const T* src = Qd + t * qd.stride(0) + b * qd.stride(1) + h * qd.stride(2) + (i0 + i) * qd.stride(3);
          T* dst = Qp + (i * K + t) * E;
          for (int64_t e = 0; e < E; ++e) dst[e] = src[e * qd.stride(4)];
        }
      std::fill(Y, Y + ni * K * Ev, T(0));
      std::fill(r, r + ni * K, T(0));
      const int64_t jend = causal ? std::min(S, i0 + ni) : S;
      for (int64_t j0 = 0; j0 < jend; j0 += BN) {
        const int64_t nj = std::min(BN, S - j0), tile = j0 / BN;
        // p = exp(s - lse), recomputed exactly (no running max: lse is final); a row with lse = -inf is masked
        scores<T>(qb, kb + j0 * E, ni, nj, E, scale, bias, b, h, i0, j0, causal, p, BN);
        for (int64_t i = 0; i < ni; ++i) {
          T* pi = p + i * BN;
          const T li = lb[i];
          if (li == -std::numeric_limits<T>::infinity()) {
            std::fill(pi, pi + nj, T(0));
            continue;
          }
#pragma omp simd
          for (int64_t j = 0; j < nj; ++j) pi[j] = exp_simd(pi[j] - li);
        }
        // W[(i, t), j] = q_i.kdot_tj (one GEMM for all tangents) + qdot_ti.k_j (one GEMM, rows (i, t))
        const T* kdt = kdp + (bh * nbj + tile) * K * BN * E;
        gemm<T>(ni, K * BN, E, T(1), qb, E, kdt, E, /*trans_b=*/true, T(0), W, K * BN);
        gemm<T>(ni * K, nj, E, T(1), Qp, E, kb + j0 * E, E, /*trans_b=*/true, T(1), W, BN);
        // W *= p (shared by the K tangents), r += row sums
        for (int64_t i = 0; i < ni; ++i) {
          const T* pi = p + i * BN;
          for (int64_t t = 0; t < K; ++t) {
            T* w = W + (i * K + t) * BN;
            T acc = 0;
#pragma omp simd reduction(+ : acc)
            for (int64_t j = 0; j < nj; ++j) {
              const T z = pi[j] * w[j];
              w[j] = z;
              acc += z;
            }
            r[i * K + t] += acc;
          }
        }
        // Y[(i, t), :] += scale W_(i,t) v_tile;  Y[i, (t, c)] += p_i vdot_tile
        gemm<T>(ni * K, Ev, nj, scale, W, BN, vb + j0 * Ev, Ev, false, T(1), Y, Ev);
        gemm<T>(ni, K * Ev, nj, T(1), p, BN, vdp + (bh * nbj + tile) * BN * K * Ev, K * Ev, false, T(1), Y, K * Ev);
      }
      // odot_ti = Y_ti - scale r_ti o_i, stored token-major od[t, b, i, h, :]
      for (int64_t i = 0; i < ni; ++i) {
        const T* oi = o + (bh * L + i0 + i) * Ev;
        for (int64_t t = 0; t < K; ++t) {
          T* dst = Od + (((t * B + b) * L + i0 + i) * H + h) * Ev;
          const T* y = Y + (i * K + t) * Ev;
          const T rr = scale * r[i * K + t];
#pragma omp simd
          for (int64_t c = 0; c < Ev; ++c) dst[c] = y[c] - rr * oi[c];
        }
      }
    }
  });
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const char* names[] = {"q", "k", "v"};
  const at::Tensor* ts[] = {&q, &k, &v};
  for (int n = 0; n < 3; ++n) {
    FJ_CHECK_CPU(*ts[n], names[n]);
    FJ_CHECK_FLOAT(*ts[n], names[n]);
    FJ_CHECK_SAME_DTYPE(*ts[n], q, names[n]);
    FJ_CHECK_DIM(*ts[n], 4, names[n]);
  }
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "k: expected [",
              q.size(0), ", ", q.size(1), ", S, ", q.size(3), "] (as q but S keys), got ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == k.size(2), "v: expected [",
              q.size(0), ", ", q.size(1), ", ", k.size(2), ", Ev], got ", v.sizes());
  TORCH_CHECK(k.size(2) < (1LL << 31) && q.size(2) < (1LL << 31), "flash: sequence too long for BLAS");
}

Bias make_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& q, int64_t S, at::Tensor& keep) {
  Bias out;
  if (!bias.has_value()) return out;
  const at::Tensor& t = *bias;
  FJ_CHECK_CPU(t, "bias");
  FJ_CHECK_SAME_DTYPE(t, q, "bias");
  TORCH_CHECK(t.dim() <= 4, "bias: expected at most 4 dimensions (broadcastable to [B, H, L, S]), got ", t.sizes());
  std::vector<int64_t> shape = {q.size(0), q.size(1), q.size(2), S};
  std::vector<int64_t> bs(4 - t.dim(), 1);
  for (int64_t d = 0; d < t.dim(); ++d) bs.push_back(t.size(d));
  for (int d = 0; d < 4; ++d)
    TORCH_CHECK(bs[d] == 1 || bs[d] == shape[d], "bias: shape ", t.sizes(), " does not broadcast to [", shape[0],
                ", ", shape[1], ", ", shape[2], ", ", shape[3], "]");
  keep = t.expand(shape);  // a view: broadcast dimensions get stride 0, nothing is copied
  out.ptr = keep.data_ptr();
  out.sb = keep.stride(0), out.sh = keep.stride(1), out.sl = keep.stride(2), out.ss = keep.stride(3);
  return out;
}

}  // namespace

// fastjac::flash_fwd(q [B,H,L,E], k [B,H,S,E], v [B,H,S,Ev], scale, causal, bias?, block_m, block_n)
//   -> (o [B,H,L,Ev], lse [B,H,L])
std::tuple<at::Tensor, at::Tensor> flash_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, bool causal, const c10::optional<at::Tensor>& bias,
                                                 int64_t block_m, int64_t block_n) {
  check_qkv(q, k, v);
  at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), keep;
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), S = k.size(2), Ev = v.size(3);
  Bias bb = make_bias(bias, q, S, keep);
  at::Tensor o = at::empty({B, H, L, Ev}, q.options()), lse = at::empty({B, H, L}, q.options());
  if (B * H * L == 0) return {o, lse};
  if (S == 0) {  // no keys: every row is fully masked
    o.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {o, lse};
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_fwd", [&] {
    flash_fwd<scalar_t>(qc, kc, vc, scale, causal, bb, block_m, block_n, o, lse);
  });
  return {o, lse};
}

// fastjac::flash_jvp(q, k, v, o, lse, qd [K,B,H,L,E], kd [K,B,H,S,E], vd [K,B,H,S,Ev], scale, causal, bias?,
//   block_m, block_n) -> od [K, B, L, H, Ev] (token-major: the output projection is then one GEMM)
at::Tensor flash_jvp_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                         const at::Tensor& lse, const at::Tensor& qd, const at::Tensor& kd, const at::Tensor& vd,
                         double scale, bool causal, const c10::optional<at::Tensor>& bias, int64_t block_m,
                         int64_t block_n) {
  check_qkv(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3), S = k.size(2), Ev = v.size(3);
  const char* names[] = {"o", "lse", "qd", "kd", "vd"};
  const at::Tensor* ts[] = {&o, &lse, &qd, &kd, &vd};
  const int dims[] = {4, 3, 5, 5, 5};
  for (int n = 0; n < 5; ++n) {
    FJ_CHECK_CPU(*ts[n], names[n]);
    FJ_CHECK_SAME_DTYPE(*ts[n], q, names[n]);
    FJ_CHECK_DIM(*ts[n], dims[n], names[n]);
  }
  TORCH_CHECK(o.size(0) == B && o.size(1) == H && o.size(2) == L && o.size(3) == Ev, "o: expected [", B, ", ", H,
              ", ", L, ", ", Ev, "], got ", o.sizes());
  TORCH_CHECK(lse.size(0) == B && lse.size(1) == H && lse.size(2) == L, "lse: expected [", B, ", ", H, ", ", L,
              "], got ", lse.sizes());
  const int64_t K = qd.size(0);
  TORCH_CHECK(qd.size(1) == B && qd.size(2) == H && qd.size(3) == L && qd.size(4) == E, "qd: expected [K, ", B,
              ", ", H, ", ", L, ", ", E, "], got ", qd.sizes());
  TORCH_CHECK(kd.size(0) == K && kd.size(1) == B && kd.size(2) == H && kd.size(3) == S && kd.size(4) == E,
              "kd: expected [", K, ", ", B, ", ", H, ", ", S, ", ", E, "], got ", kd.sizes());
  TORCH_CHECK(vd.size(0) == K && vd.size(1) == B && vd.size(2) == H && vd.size(3) == S && vd.size(4) == Ev,
              "vd: expected [", K, ", ", B, ", ", H, ", ", S, ", ", Ev, "], got ", vd.sizes());
  at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), oc = o.contiguous(),
             lc = lse.contiguous(), keep;
  Bias bb = make_bias(bias, q, S, keep);
  at::Tensor od = at::empty({K, B, L, H, Ev}, q.options());
  if (od.numel() == 0) return od;
  if (S == 0) return od.zero_();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "flash_jvp", [&] {
    flash_jvp_k<scalar_t>(qc, kc, vc, oc, lc, qd, kd, vd, scale, causal, bb, block_m, block_n, od);
  });
  return od;
}

}  // namespace fastjac
