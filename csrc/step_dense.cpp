// The dense step Jacobian writer: every element of the [S*D, S*D] output written once from small per-token
// factors (as the Triton kernel _step_dense_fwd_kernel). Kernel step_dense_fwd -> op fastjac::step_dense_.
//
//   out[i, a, m, b] = sum_h  A_h[i, m] R1[i, h, a, b]  +  U[h, i, m, a] rb[i, h, b]   (+ Ed[i, a, b] if m == i)
//
// For one output row (i, a) the 2H right-hand vectors R1[i, h, a, :], rb[i, h, :] are packed once; each block
// (m, :) of the row is then 2H multiply-adds per element, accumulated in registers and stored once.
#include "common.h"

#include <limits>
#include <vector>

namespace fastjac {

// One output row: dst[m D + b] = sum_hh coef[m H2 + hh] rhs[hh D + b] (+ e[b] when m == diag) for m < mend, and 0
// for m >= mend (causal rows). 2H multiply-adds per element accumulated in registers (two cache lines at a time),
// each element stored once. Shared by both writers.
template <typename T>
inline void dense_row(T* dst, int64_t S, int64_t D, int64_t H2, const T* coef, const T* rhs, const T* e,
                      int64_t diag, int64_t mend) {
  constexpr int64_t VB = 64 / sizeof(T) * 2;
  for (int64_t m = 0; m < mend; ++m) {
    const T* cm = coef + m * H2;
    T* d = dst + m * D;
    const T* em = m == diag ? e : nullptr;
    int64_t b0 = 0;
    for (; b0 + VB <= D; b0 += VB) {
      T acc[VB];
      if (em) {
        for (int64_t x = 0; x < VB; ++x) acc[x] = em[b0 + x];
      } else {
        for (int64_t x = 0; x < VB; ++x) acc[x] = T(0);
      }
      for (int64_t hh = 0; hh < H2; ++hh) {
        const T c = cm[hh];
        const T* rp = rhs + hh * D + b0;
#pragma omp simd
        for (int64_t x = 0; x < VB; ++x) acc[x] += c * rp[x];
      }
#pragma omp simd
      for (int64_t x = 0; x < VB; ++x) d[b0 + x] = acc[x];
    }
    for (; b0 < D; ++b0) {
      T acc = em ? em[b0] : T(0);
      for (int64_t hh = 0; hh < H2; ++hh) acc += cm[hh] * rhs[hh * D + b0];
      d[b0] = acc;
    }
  }
  if (mend < S) std::fill(dst + mend * D, dst + S * D, T(0));
}

template <typename T>
static void step_dense_fwd(const at::Tensor& A_, const at::Tensor& R1_, const at::Tensor& U_, const at::Tensor& rb_,
                           const at::Tensor& Ed_, at::Tensor& out_, int64_t i0) {
  const int64_t H = A_.size(0), S = A_.size(1), I = Ed_.size(0), D = Ed_.size(2);
  const T* A = A_.data_ptr<T>();   // [H, S, S] contiguous
  const T* R1 = R1_.data_ptr<T>(); // [I, H, D, D], strides r1s0 (may be 0), r1s1, r1s2, 1
  const T* U = U_.data_ptr<T>();   // [H, I, S, D] contiguous
  const T* rb = rb_.data_ptr<T>(); // [S, H, D] contiguous
  const T* Ed = Ed_.data_ptr<T>(); // [I, D, D] contiguous
  T* out = out_.data_ptr<T>();
  const int64_t ld = out_.stride(0);
  const int64_t r1s0 = R1_.stride(0), r1s1 = R1_.stride(1), r1s2 = R1_.stride(2);
  const int64_t H2 = 2 * H;
  at::parallel_for(0, I * D, 8, [&](int64_t lo, int64_t hi) {
    std::vector<T> rhs((size_t)(H2 * D)), coef((size_t)(H2 * S));
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t il = r / D, a = r % D, i = i0 + il;
      for (int64_t h = 0; h < H; ++h) {
        const T* r1 = R1 + il * r1s0 + h * r1s1 + a * r1s2;
        const T* rbh = rb + (i * H + h) * D;
        std::copy(r1, r1 + D, rhs.data() + h * D);
        std::copy(rbh, rbh + D, rhs.data() + (H + h) * D);
      }
      for (int64_t m = 0; m < S; ++m)
        for (int64_t h = 0; h < H; ++h) {
          coef[m * H2 + h] = A[(h * S + i) * S + m];
          coef[m * H2 + H + h] = U[((h * I + il) * S + m) * D + a];
        }
      dense_row<T>(out + (i * D + a) * ld, S, D, H2, coef.data(), rhs.data(), Ed + (il * D + a) * D, i, S);
    }
  });
}

// The fused writer: per token i (parallel over (b, i)) it recomputes the probability rows p_h[i, :] (one softmax
// row per head), builds every factor of its D output rows in scratch (U, R1 = eta L_i (Wv Wo)^T, rb = eta beta Wk q_i,
// the diagonal block Ed = L_i diag + E_i) by small GEMMs, and writes the rows once with dense_row. No [S, S] or
// [H, I, S, D] tensor exists: the scratch is O(H S D) per thread.
//   out[i, a, m, b] = sum_h p_h[i, m] R1_h[a, b] + U_h[a, m] rb_h[b]  (+ Ed[a, b] if m == i)
//   U_h[a, m] = p_h[i, m] (L_i (vo_hm - oo_hi))_a,  Ed = E_i + eta beta sum_h (U_h k_h) Wq_h^T
//   (U_h k_h = L_i sum_m p_h[i, m] (vo_hm - oo_hi) k_hm^T: the diagonal block's attention part, [D, dh])
template <typename T>
static void step_dense_flash(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& vo_, const at::Tensor& oo_,
                             const T* Lm, const at::Tensor& E_, const at::Tensor& wvoT_,
                             const at::Tensor& wq_, const at::Tensor& wk_, double eta_d, double beta_d, bool causal,
                             at::Tensor& out_) {
  const int64_t B = q_.size(0), H = q_.size(1), S = q_.size(2), dh = q_.size(3), D = vo_.size(3);
  const T eta = (T)eta_d, beta = (T)beta_d;
  const T* q = q_.data_ptr<T>();      // [B, H, S, dh]
  const T* k = k_.data_ptr<T>();      // [B, H, S, dh]
  const T* vo = vo_.data_ptr<T>();    // [B, H, S, D]
  const T* oo = oo_.data_ptr<T>();    // [B, H, S, D]
  const T* E = E_.data_ptr<T>();      // [B, S, D, D]; Lm likewise or null (L = I)
  const T* wvoT = wvoT_.data_ptr<T>();  // [H, D, D]
  const T* wq = wq_.data_ptr<T>();    // [H, D, dh]
  const T* wk = wk_.data_ptr<T>();
  T* out = out_.data_ptr<T>();
  const int64_t ob = out_.stride(0), ld = out_.stride(1);
  const int64_t H2 = 2 * H;
  // L = I: R1_h = eta (Wv Wo)_h^T is the same for every token
  std::vector<T> R1c;
  if (!Lm) {
    R1c.resize((size_t)(H * D * D));
    for (int64_t x = 0; x < H * D * D; ++x) R1c[x] = eta * wvoT[x];
  }
  at::parallel_for(0, B * S, 1, [&](int64_t lo, int64_t hi) {
    std::vector<T> P((size_t)(H * S)), Ut((size_t)(H * D * S)), R1(Lm ? (size_t)(H * D * D) : 0),
        rb((size_t)(H * D)), Mk((size_t)(D * dh)), diag((size_t)(D * D)),
        Ed((size_t)(D * D)), Lo((size_t)D), coef((size_t)(S * H2)), rhs((size_t)(H2 * D));
    for (int64_t x = lo; x < hi; ++x) {
      const int64_t b = x / S, i = x % S, mend = causal ? i + 1 : S;
      const T* Li = Lm ? Lm + (b * S + i) * D * D : nullptr;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t bh = b * H + h;
        const T* qi = q + (bh * S + i) * dh;
        const T* kh = k + bh * S * dh;
        const T* voh = vo + bh * S * D;
        const T* ooi = oo + (bh * S + i) * D;
        T* ph = P.data() + h * S;
        // p_h[i, m] = softmax_m(beta q_i.k_m), m < mend: the whole row is at hand, so it is normalised here
        // (exp(s - max) / sum) rather than through the forward's lse, whose rounding (ulp(|lse|)) would enter
        // every p as a relative error
        gemm<T>(1, mend, dh, beta, qi, dh, kh, dh, /*trans_b=*/true, T(0), ph, S);
        T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
        for (int64_t m = 0; m < mend; ++m) mx = ph[m] > mx ? ph[m] : mx;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t m = 0; m < mend; ++m) {
          ph[m] = exp_simd(ph[m] - mx);
          sum += ph[m];
        }
        const T inv = T(1) / sum;
#pragma omp simd
        for (int64_t m = 0; m < mend; ++m) ph[m] *= inv;
        // U_h [D, mend] (ld S)
        T* Uh = Ut.data() + h * D * S;
        if (Li) {
          gemm<T>(D, mend, D, T(1), Li, D, voh, D, /*trans_b=*/true, T(0), Uh, S);
          gemm<T>(1, D, D, T(1), ooi, D, Li, D, /*trans_b=*/true, T(0), Lo.data(), D);  // Lo = L_i oo_i
          for (int64_t a = 0; a < D; ++a) {
            T* ua = Uh + a * S;
            const T la = Lo[a];
#pragma omp simd
            for (int64_t m = 0; m < mend; ++m) ua[m] = ph[m] * (ua[m] - la);
          }
        } else {
          for (int64_t m = 0; m < mend; ++m) {
            const T* vm = voh + m * D;
            const T pm = ph[m];
            for (int64_t a = 0; a < D; ++a) Uh[a * S + m] = pm * (vm[a] - ooi[a]);
          }
        }
        if (Li) gemm<T>(D, D, D, eta, Li, D, wvoT + h * D * D, D, false, T(0), R1.data() + h * D * D, D);
        gemm<T>(1, D, dh, eta * beta, qi, dh, wk + h * D * dh, dh, /*trans_b=*/true, T(0), rb.data() + h * D, D);
        // diag += eta beta (L_i Mk_h) Wq_h^T with L_i Mk_h = U_h k_h = sum_m p_m L_i (vo_m - oo_i) k_m^T: from U
        // directly, never as vo^T (p k) - oo (p^T k)^T (that difference cancels badly in float32)
        gemm<T>(D, dh, mend, T(1), Uh, S, kh, dh, false, T(0), Mk.data(), dh);
        gemm<T>(D, D, dh, eta * beta, Mk.data(), dh, wq + h * D * dh, dh, /*trans_b=*/true, h == 0 ? T(0) : T(1),
                diag.data(), D);
      }
      const T* Ei = E + (b * S + i) * D * D;
      for (int64_t z = 0; z < D * D; ++z) Ed[z] = Ei[z] + diag[z];
      const T* R1b = Li ? R1.data() : R1c.data();
      for (int64_t m = 0; m < mend; ++m)
        for (int64_t h = 0; h < H; ++h) coef[m * H2 + h] = P[h * S + m];
      for (int64_t a = 0; a < D; ++a) {
        for (int64_t h = 0; h < H; ++h) {
          std::copy(R1b + (h * D + a) * D, R1b + (h * D + a + 1) * D, rhs.begin() + h * D);
          std::copy(rb.begin() + h * D, rb.begin() + (h + 1) * D, rhs.begin() + (H + h) * D);
          const T* ua = Ut.data() + (h * D + a) * S;
          for (int64_t m = 0; m < mend; ++m) coef[m * H2 + H + h] = ua[m];
        }
        dense_row<T>(out + b * ob + (i * D + a) * ld, S, D, H2, coef.data(), rhs.data(), Ed.data() + a * D, i,
                     mend);
      }
    }
  });
}

// fastjac::step_dense_(A [H, S, S], R1 [I, H, D, D], U [H, I, S, D], rb [S, H, D], Ed [I, D, D], out [S*D, S*D]
// (rows contiguous), i0) -> (): writes the rows (i, a), i in [i0, i0 + I), of one sample's step Jacobian into out.
void step_dense_cpu(const at::Tensor& A, const at::Tensor& R1, const at::Tensor& U, const at::Tensor& rb,
                    const at::Tensor& Ed, at::Tensor out, int64_t i0) {
  const char* names[] = {"A", "R1", "U", "rb", "Ed", "out"};
  const at::Tensor* ts[] = {&A, &R1, &U, &rb, &Ed, &out};
  const int dims[] = {3, 4, 4, 3, 3, 2};
  for (int n = 0; n < 6; ++n) {
    FJ_CHECK_CPU(*ts[n], names[n]);
    FJ_CHECK_FLOAT(*ts[n], names[n]);
    FJ_CHECK_SAME_DTYPE(*ts[n], out, names[n]);
    FJ_CHECK_DIM(*ts[n], dims[n], names[n]);
  }
  const int64_t H = A.size(0), S = A.size(1), I = Ed.size(0), D = Ed.size(2);
  TORCH_CHECK(A.size(2) == S, "A: expected [H, S, S], got ", A.sizes());
  TORCH_CHECK(Ed.size(1) == D, "Ed: expected [I, D, D], got ", Ed.sizes());
  TORCH_CHECK(i0 >= 0 && i0 + I <= S, "i0: rows [", i0, ", ", i0 + I, ") are not inside [0, ", S, ")");
  TORCH_CHECK(R1.size(0) == I && R1.size(1) == H && R1.size(2) == D && R1.size(3) == D, "R1: expected [", I, ", ",
              H, ", ", D, ", ", D, "], got ", R1.sizes());
  TORCH_CHECK(D <= 1 || R1.stride(3) == 1, "R1: expected a contiguous last dimension");
  TORCH_CHECK(U.size(0) == H && U.size(1) == I && U.size(2) == S && U.size(3) == D, "U: expected [", H, ", ", I,
              ", ", S, ", ", D, "], got ", U.sizes());
  TORCH_CHECK(rb.size(0) == S && rb.size(1) == H && rb.size(2) == D, "rb: expected [", S, ", ", H, ", ", D,
              "], got ", rb.sizes());
  TORCH_CHECK(out.size(0) == S * D && out.size(1) == S * D, "out: expected [", S * D, ", ", S * D, "], got ",
              out.sizes());
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, "out: expected contiguous rows");
  if (I == 0 || D == 0 || S == 0) return;
  at::Tensor Ac = A.contiguous(), Uc = U.contiguous(), rbc = rb.contiguous(), Edc = Ed.contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "step_dense_fwd", [&] {
    step_dense_fwd<scalar_t>(Ac, R1, Uc, rbc, Edc, out, i0);
  });
}

}  // namespace fastjac

namespace fastjac {

// fastjac::step_dense_flash_(q, k [B,H,S,dh], vo, oo [B,H,S,D], L? [B,S,D,D], E [B,S,D,D],
// wvoT [H,D,D], wq, wk [H,D,dh], eta, beta, causal, out [B, S*D, S*D] (rows contiguous)) -> (): the whole dense
// step Jacobian of every sample, its factors built in the op (see step_dense_flash).
void step_dense_flash_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& vo, const at::Tensor& oo,
                          const c10::optional<at::Tensor>& L, const at::Tensor& E,
                          const at::Tensor& wvoT, const at::Tensor& wq, const at::Tensor& wk, double eta, double beta,
                          bool causal, at::Tensor out) {
  const char* names[] = {"q", "k", "vo", "oo", "E", "wvoT", "wq", "wk", "out"};
  const at::Tensor* ts[] = {&q, &k, &vo, &oo, &E, &wvoT, &wq, &wk, &out};
  const int dims[] = {4, 4, 4, 4, 4, 3, 3, 3, 3};
  for (int n = 0; n < 9; ++n) {
    FJ_CHECK_CPU(*ts[n], names[n]);
    FJ_CHECK_FLOAT(*ts[n], names[n]);
    FJ_CHECK_SAME_DTYPE(*ts[n], out, names[n]);
    FJ_CHECK_DIM(*ts[n], dims[n], names[n]);
  }
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), dh = q.size(3), D = vo.size(3);
  TORCH_CHECK(k.sizes() == q.sizes(), "k: expected shape ", q.sizes(), " (as q), got ", k.sizes());
  TORCH_CHECK(vo.size(0) == B && vo.size(1) == H && vo.size(2) == S, "vo: expected [", B, ", ", H, ", ", S,
              ", D], got ", vo.sizes());
  TORCH_CHECK(oo.sizes() == vo.sizes(), "oo: expected shape ", vo.sizes(), " (as vo), got ", oo.sizes());
  std::vector<int64_t> sdd = {B, S, D, D};
  TORCH_CHECK(E.sizes() == at::IntArrayRef(sdd), "E: expected [", B, ", ", S, ", ", D, ", ", D, "], got ",
              E.sizes());
  TORCH_CHECK(wvoT.size(0) == H && wvoT.size(1) == D && wvoT.size(2) == D, "wvoT: expected [", H, ", ", D, ", ", D,
              "], got ", wvoT.sizes());
  TORCH_CHECK(wq.size(0) == H && wq.size(1) == D && wq.size(2) == dh, "wq: expected [", H, ", ", D, ", ", dh,
              "], got ", wq.sizes());
  TORCH_CHECK(wk.sizes() == wq.sizes(), "wk: expected shape ", wq.sizes(), " (as wq), got ", wk.sizes());
  TORCH_CHECK(out.size(0) == B && out.size(1) == S * D && out.size(2) == S * D, "out: expected [", B, ", ", S * D,
              ", ", S * D, "], got ", out.sizes());
  TORCH_CHECK(out.size(2) <= 1 || out.stride(2) == 1, "out: expected contiguous rows");
  at::Tensor Lc;
  if (L.has_value()) {
    FJ_CHECK_CPU(*L, "L");
    FJ_CHECK_SAME_DTYPE(*L, out, "L");
    TORCH_CHECK(L->sizes() == at::IntArrayRef(sdd), "L: expected [", B, ", ", S, ", ", D, ", ", D, "], got ",
                L->sizes());
    Lc = L->contiguous();
  }
  if (B == 0 || S == 0 || D == 0) return;
  at::Tensor qc = q.contiguous(), kc = k.contiguous(), voc = vo.contiguous(), ooc = oo.contiguous(),
             Ec = E.contiguous(), wvc = wvoT.contiguous(), wqc = wq.contiguous(),
             wkc = wk.contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "step_dense_flash", [&] {
    step_dense_flash<scalar_t>(qc, kc, voc, ooc, Lc.defined() ? Lc.data_ptr<scalar_t>() : nullptr, Ec, wvc, wqc,
                               wkc, eta, beta, causal, out);
  });
}

}  // namespace fastjac
