// k-tangent attention JVP, one pass per (batch, head, block of query rows), all tangents sharing the
// probabilities A (computed once, by the forward). Kernel attn_jvp_fwd -> op fastjac::attn_jvp.
//
//   odot_ti = sum_j A_ij vdot_tj + beta [ sum_j W_tij v_j - r_ti o_i ] + beta qdot_ti^T M_i
//   W_tij = A_ij (q_i . kdot_tj),  r_ti = sum_j W_tij,  M_i = sum_j A_ij k_j (v_j - o_i)^T   [dh, dv]
//
// (the q-dot half of Ldot_ij = beta (qdot_i.k_j + q_i.kdot_j) folds into the tangent-independent M_i, so only
// the kdot half needs a per-tangent S x S pass). Per task the [BM, K, S] block of W lives in a scratch buffer
// sized to stay in L2; no K x S x S tensor exists. The three block products are GEMMs on torch's BLAS.
#include "common.h"

#include <algorithm>
#include <vector>

namespace fastjac {

template <typename T>
static void attn_jvp_fwd(const at::Tensor& A_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                         const at::Tensor& o_, const at::Tensor& qd, const at::Tensor& kd, const at::Tensor& vd,
                         double beta_d, bool causal, at::Tensor& od) {
  const int64_t B = q_.size(0), H = q_.size(1), S = q_.size(2), dh = q_.size(3), dv = v_.size(3);
  const int64_t K = qd.size(0);
  const T beta = (T)beta_d;
  const T* A = A_.data_ptr<T>();  // [B, H, S, S]
  const T* q = q_.data_ptr<T>();  // [B, H, S, dh]
  const T* k = k_.data_ptr<T>();
  const T* v = v_.data_ptr<T>();  // [B, H, S, dv]
  const T* o = o_.data_ptr<T>();
  const T* Qd = qd.data_ptr<T>();  // [K, B, H, S, dh], last dim contiguous
  const T* Kd = kd.data_ptr<T>();
  const T* Vd = vd.data_ptr<T>();
  T* Od = od.data_ptr<T>();  // [K, B, S, H, dv] contiguous
  const int64_t qs0 = qd.stride(0), qs1 = qd.stride(1), qs2 = qd.stride(2), qs3 = qd.stride(3);
  const int64_t ks0 = kd.stride(0), ks1 = kd.stride(1), ks2 = kd.stride(2), ks3 = kd.stride(3);
  const int64_t vs0 = vd.stride(0), vs1 = vd.stride(1), vs2 = vd.stride(2), vs3 = vd.stride(3);

  // pack once per (b, h): kdot as [K*S, dh] (rows (t, j)), vdot as [S, K*dv] (rows j, cols (t, c)), and
  // k (x) v as [S, dh*dv] (row j: k_j v_j^T), the right factor of M_i for all rows i in one GEMM
  const auto opt = q_.options();
  at::Tensor kdp_ = at::empty({B * H * K * S * dh}, opt), vdp_ = at::empty({B * H * S * K * dv}, opt),
             kvp_ = at::empty({B * H * S * dh * dv}, opt);
  T* kdp = kdp_.data_ptr<T>();
  T* vdp = vdp_.data_ptr<T>();
  T* kvp = kvp_.data_ptr<T>();
  at::parallel_for(0, B * H * K, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t x = lo; x < hi; ++x) {
      const int64_t bh = x / K, t = x % K, b = bh / H, h = bh % H;
      T* kp = kdp + (bh * K + t) * S * dh;
      T* vp = vdp + bh * S * K * dv + t * dv;
      for (int64_t j = 0; j < S; ++j) {
        const T* ks = Kd + t * ks0 + b * ks1 + h * ks2 + j * ks3;
        const T* vs = Vd + t * vs0 + b * vs1 + h * vs2 + j * vs3;
        std::copy(ks, ks + dh, kp + j * dh);
        std::copy(vs, vs + dv, vp + j * K * dv);
      }
      if (t == 0) {
        for (int64_t j = 0; j < S; ++j) {
          const T* kj = k + (bh * S + j) * dh;
          const T* vj = v + (bh * S + j) * dv;
          T* dst = kvp + (bh * S + j) * dh * dv;
          for (int64_t e = 0; e < dh; ++e) {
            const T ke = kj[e];
#pragma omp simd
            for (int64_t c = 0; c < dv; ++c) dst[e * dv + c] = ke * vj[c];
          }
        }
      }
    }
  });

  // query-row block: the [BM, K, S] scratch of W stays near 256 KB (L2 holds it with the packed tangents)
  const int64_t BM = std::max<int64_t>(
      1, std::min<int64_t>(S, (256 * 1024) / std::max<int64_t>(1, (K * S + dh * dv) * (int64_t)sizeof(T))));
  const int64_t nblk = (S + BM - 1) / BM;
  at::parallel_for(0, B * H * nblk, 1, [&](int64_t lo, int64_t hi) {
    at::Tensor scratch = at::empty({BM * K * S + BM * K * dv + BM * K + BM * dh * dv + BM * dh}, opt);
    T* W = scratch.data_ptr<T>();  // [BM, K, Sj]
    T* Y = W + BM * K * S;         // [BM, K, dv]
    T* r = Y + BM * K * dv;        // [BM, K]
    T* M = r + BM * K;             // [BM, dh, dv]
    T* ak = M + BM * dh * dv;      // [BM, dh]
    for (int64_t x = lo; x < hi; ++x) {
      const int64_t bh = x / nblk, blk = x % nblk, b = bh / H, h = bh % H;
      const int64_t i0 = blk * BM, i1 = std::min(S, i0 + BM), ni = i1 - i0;
      const int64_t Sj = causal ? i1 : S;  // causal: keys j >= i1 have A_ij = 0 for every row of the block
      const T* Ab = A + (bh * S + i0) * S;   // [ni, S] rows of A
      const T* qb = q + (bh * S + i0) * dh;  // [ni, dh]
      const T* kb = k + bh * S * dh;
      const T* vb = v + bh * S * dv;
      const T* ob = o + bh * S * dv;
      const T* kp = kdp + bh * K * S * dh;
      const T* vp = vdp + bh * S * K * dv;
      // G[i, (t, j)] = q_i . kdot_tj, all tangents in one GEMM (causal: a [ni, Sj] panel per tangent)
      if (Sj == S) {
        gemm<T>(ni, K * S, dh, T(1), qb, dh, kp, dh, /*trans_b=*/true, T(0), W, K * S);
      } else {
        for (int64_t t = 0; t < K; ++t)
          gemm<T>(ni, Sj, dh, T(1), qb, dh, kp + t * S * dh, dh, true, T(0), W + t * Sj, K * Sj);
      }
      // W = A (.) G and its row sums r, in place; W laid out [ni, K, Sj]
      for (int64_t i = 0; i < ni; ++i) {
        const T* a = Ab + i * S;
        for (int64_t t = 0; t < K; ++t) {
          T* w = W + (i * K + t) * Sj;
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < Sj; ++j) {
            const T p = a[j] * w[j];
            w[j] = p;
            acc += p;
          }
          r[i * K + t] = beta * acc;
        }
      }
      // Y[(i, t), :] = beta W_ti @ v  +  A_i @ vdot_t   (both [ni*K, dv] in the layout (i, t, c))
      gemm<T>(ni * K, dv, Sj, beta, W, Sj, vb, dv, false, T(0), Y, dv);
      gemm<T>(ni, K * dv, Sj, T(1), Ab, S, vp, K * dv, false, T(1), Y, K * dv);
      // M_i = beta (sum_j A_ij k_j v_j^T - (sum_j A_ij k_j) o_i^T): two GEMMs for the block, then a rank-1 fix
      gemm<T>(ni, dh * dv, Sj, beta, Ab, S, kvp + bh * S * dh * dv, dh * dv, false, T(0), M, dh * dv);
      gemm<T>(ni, dh, Sj, beta, Ab, S, kb, dh, false, T(0), ak, dh);
      for (int64_t i = 0; i < ni; ++i) {
        const int64_t ig = i0 + i;
        const T* oi = ob + ig * dv;
        T* Mi = M + i * dh * dv;
        for (int64_t e = 0; e < dh; ++e) {
          const T s = ak[i * dh + e];
#pragma omp simd
          for (int64_t c = 0; c < dv; ++c) Mi[e * dv + c] -= s * oi[c];
        }
        // Y_i [K, dv] += qdot_i [K, dh] @ M_i [dh, dv]  (qdot rows t are qs0 apart)
        gemm<T>(K, dv, dh, T(1), Qd + b * qs1 + h * qs2 + ig * qs3, qs0, Mi, dv, false, T(1), Y + i * K * dv, dv);
        // odot_ti = Y_ti - beta r_ti o_i, written to od[t, b, i, h, :]
        for (int64_t t = 0; t < K; ++t) {
          T* dst = Od + (((t * B + b) * S + ig) * H + h) * dv;
          const T* y = Y + (i * K + t) * dv;
          const T rr = r[i * K + t];
#pragma omp simd
          for (int64_t c = 0; c < dv; ++c) dst[c] = y[c] - rr * oi[c];
        }
      }
    }
  });
}

// fastjac::attn_jvp(A [B,H,S,S], q, k [B,H,S,dh], v, o [B,H,S,dv], qd, kd [K,B,H,S,dh], vd [K,B,H,S,dv], beta,
// causal) -> od [K, B, S, H, dv] (token-major, so the output projection is one GEMM by [H*dv, D])
at::Tensor attn_jvp_cpu(const at::Tensor& A, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& o, const at::Tensor& qd, const at::Tensor& kd, const at::Tensor& vd,
                        double beta, bool causal) {
  const char* names[] = {"A", "q", "k", "v", "o", "qd", "kd", "vd"};
  const at::Tensor* ts[] = {&A, &q, &k, &v, &o, &qd, &kd, &vd};
  for (int n = 0; n < 8; ++n) {
    FJ_CHECK_CPU(*ts[n], names[n]);
    FJ_CHECK_FLOAT(*ts[n], names[n]);
    FJ_CHECK_SAME_DTYPE(*ts[n], q, names[n]);
    FJ_CHECK_DIM(*ts[n], n < 5 ? 4 : 5, names[n]);
  }
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), dh = q.size(3), dv = v.size(3), K = qd.size(0);
  TORCH_CHECK(k.sizes() == q.sizes(), "k: expected shape ", q.sizes(), " (as q), got ", k.sizes());
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == S, "v: expected [", B, ", ", H, ", ", S,
              ", dv], got ", v.sizes());
  TORCH_CHECK(o.sizes() == v.sizes(), "o: expected shape ", v.sizes(), " (as v), got ", o.sizes());
  TORCH_CHECK(A.size(0) == B && A.size(1) == H && A.size(2) == S && A.size(3) == S, "A: expected [", B, ", ", H,
              ", ", S, ", ", S, "], got ", A.sizes());
  TORCH_CHECK(qd.size(1) == B && qd.size(2) == H && qd.size(3) == S && qd.size(4) == dh, "qd: expected [K, ", B,
              ", ", H, ", ", S, ", ", dh, "], got ", qd.sizes());
  TORCH_CHECK(kd.sizes() == qd.sizes(), "kd: expected shape ", qd.sizes(), " (as qd), got ", kd.sizes());
  TORCH_CHECK(vd.size(0) == K && vd.size(1) == B && vd.size(2) == H && vd.size(3) == S && vd.size(4) == dv,
              "vd: expected [", K, ", ", B, ", ", H, ", ", S, ", ", dv, "], got ", vd.sizes());
  for (int n = 5; n < 8; ++n)
    TORCH_CHECK(ts[n]->size(4) <= 1 || ts[n]->stride(4) == 1, names[n], ": expected a contiguous last dimension");
  TORCH_CHECK(S < (1LL << 31) / std::max<int64_t>(1, K * std::max(dh, dv)), "attn_jvp: sizes too large for BLAS");
  at::Tensor Ac = A.contiguous(), qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(),
             oc = o.contiguous();
  at::Tensor od = at::empty({K, B, S, H, dv}, q.options());
  if (od.numel() == 0) return od;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attn_jvp_fwd", [&] {
    attn_jvp_fwd<scalar_t>(Ac, qc, kc, vc, oc, qd, kd, vd, beta, causal, od);
  });
  return od;
}

}  // namespace fastjac
