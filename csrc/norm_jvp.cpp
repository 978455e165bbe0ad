// Residual + normalisation JVP per group, fused: out = dNorm[T + eta R]. Kernel norm_jvp_fwd -> op
// fastjac::norm_residual_jvp.
//
//   u = T + eta R  (centred per group for "layer"),  y = gamma * ( u / s - w (w . u) / (alpha s^3) )
//
// with w (z, or the centred c) and the scale s from the forward cache; alpha = 1 ("l2") or N ("rms", "layer").
// Every tangent row is read and written once.
#include "common.h"

namespace fastjac {

template <typename T>
static void norm_jvp_fwd(const at::Tensor& T_, const at::Tensor& R_, const at::Tensor& w_, const at::Tensor& s_,
                         const at::Tensor& g_, double eta_d, int kind, int64_t N, at::Tensor& out_) {
  const int64_t D = T_.size(-1), G = D / N, rows = T_.numel() / std::max<int64_t>(D, 1);
  const int64_t BS = kind ? w_.numel() / std::max<int64_t>(D, 1) : 1;  // cache rows: tangents [K, B*S] share them
  const T* Tp = T_.data_ptr<T>();
  const T* Rp = R_.data_ptr<T>();
  const T* w = kind ? w_.data_ptr<T>() : nullptr;
  const T* s = kind ? s_.data_ptr<T>() : nullptr;
  const T* gam = g_.defined() ? g_.data_ptr<T>() : nullptr;
  T* out = out_.data_ptr<T>();
  const T eta = (T)eta_d, alpha = kind == 1 ? T(1) : (T)N, invN = T(1) / (T)N;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* tr = Tp + r * D;
      const T* rr = Rp + r * D;
      T* y = out + r * D;
#pragma omp simd
      for (int64_t a = 0; a < D; ++a) y[a] = tr[a] + eta * rr[a];
      if (kind == 0) continue;
      const int64_t cr = r % BS;
      const T* wr = w + cr * D;
      for (int64_t g = 0; g < G; ++g) {
        T* u = y + g * N;
        const T* wg = wr + g * N;
        if (kind == 3) {
          T m = 0;
#pragma omp simd reduction(+ : m)
          for (int64_t n = 0; n < N; ++n) m += u[n];
          m *= invN;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) u[n] -= m;
        }
        T wu = 0;
#pragma omp simd reduction(+ : wu)
        for (int64_t n = 0; n < N; ++n) wu += wg[n] * u[n];
        const T sg = s[cr * G + g], inv = T(1) / sg, c = wu / (alpha * sg * sg * sg);
        if (gam) {
          const T* gg = gam + g * N;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) u[n] = gg[n] * (u[n] * inv - wg[n] * c);
        } else {
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) u[n] = u[n] * inv - wg[n] * c;
        }
      }
    }
  });
}

static int norm_kind(c10::string_view kind) {
  if (kind == "none") return 0;
  if (kind == "l2") return 1;
  if (kind == "rms") return 2;
  if (kind == "layer") return 3;
  TORCH_CHECK(false, "kind: expected 'none', 'l2', 'rms' or 'layer', got '", std::string(kind), "'");
}

// fastjac::norm_residual_jvp(T [..., B, S, D], R (T's shape), w [B, S, G, N]?, s [B, S, G, 1]?, gamma [D]?,
// eta (0-dim), kind, group) -> dNorm[T + eta R] (T's shape). w and s are required unless kind is "none".
at::Tensor norm_residual_jvp_cpu(const at::Tensor& T, const at::Tensor& R, const c10::optional<at::Tensor>& w,
                                 const c10::optional<at::Tensor>& s, const c10::optional<at::Tensor>& gamma,
                                 const at::Tensor& eta, c10::string_view kind, int64_t group) {
  const int k = norm_kind(kind);
  FJ_CHECK_CPU(T, "T");
  FJ_CHECK_FLOAT(T, "T");
  TORCH_CHECK(T.dim() >= 1, "T: expected at least one dimension");
  TORCH_CHECK(R.sizes() == T.sizes(), "R: expected shape ", T.sizes(), " (as T), got ", R.sizes());
  FJ_CHECK_CPU(R, "R");
  FJ_CHECK_SAME_DTYPE(R, T, "R");
  const int64_t D = T.size(-1);
  TORCH_CHECK(group >= 1 && D % group == 0, "group: must divide D=", D, ", got ", group);
  TORCH_CHECK(eta.numel() == 1, "eta: expected one element, got shape ", eta.sizes());
  at::Tensor wc, sc, gc;
  if (k) {
    TORCH_CHECK(w.has_value() && s.has_value(), "w, s: required for kind '", std::string(kind), "'");
    wc = w->contiguous();
    sc = s->contiguous();
    FJ_CHECK_CPU(wc, "w");
    FJ_CHECK_CPU(sc, "s");
    FJ_CHECK_SAME_DTYPE(wc, T, "w");
    FJ_CHECK_SAME_DTYPE(sc, T, "s");
    TORCH_CHECK(wc.numel() > 0 ? wc.numel() % D == 0 : T.numel() == 0, "w: expected [B, S, G, N] with G*N = ", D,
                ", got ", wc.sizes());
    TORCH_CHECK(wc.size(-1) == group && wc.numel() / std::max<int64_t>(1, wc.size(-1)) == sc.numel(),
                "w, s: expected w [B, S, G, ", group, "] and s [B, S, G, 1], got ", wc.sizes(), " and ", sc.sizes());
    TORCH_CHECK(wc.numel() == 0 || (T.numel() / D) % (wc.numel() / D) == 0,
                "T: its rows must be whole copies of the cache's [B, S] rows, got T ", T.sizes(), " and w ",
                wc.sizes());
    if (gamma.has_value()) {
      gc = gamma->contiguous();
      FJ_CHECK_CPU(gc, "gamma");
      FJ_CHECK_SAME_DTYPE(gc, T, "gamma");
      TORCH_CHECK(gc.numel() == D, "gamma: expected [", D, "], got ", gc.sizes());
    }
  }
  at::Tensor Tc = T.contiguous(), Rc = R.contiguous();
  at::Tensor out = at::empty_like(Tc);
  if (out.numel() == 0) return out;
  const double eta_v = eta.item<double>();
  AT_DISPATCH_FLOATING_TYPES(T.scalar_type(), "norm_jvp_fwd", [&] {
    norm_jvp_fwd<scalar_t>(Tc, Rc, wc, sc, gc, eta_v, k, group, out);
  });
  return out;
}

}  // namespace fastjac
