// The dense step Jacobian writer: every element of the [S*D, S*D] output written once from small per-token
// factors (as the Triton kernel _step_dense_fwd_kernel). Kernel step_dense_fwd -> op fastjac::step_dense_.
//
//   out[i, a, m, b] = sum_h  A_h[i, m] R1[i, h, a, b]  +  U[h, i, m, a] rb[i, h, b]   (+ Ed[i, a, b] if m == i)
//
// For one output row (i, a) the 2H right-hand vectors R1[i, h, a, :], rb[i, h, :] are packed once; each block
// (m, :) of the row is then 2H multiply-adds per element, accumulated in registers and stored once.
#include "common.h"

#include <vector>

namespace fastjac {

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
  constexpr int64_t VB = 64 / sizeof(T) * 2;  // two cache lines of accumulators
  const int64_t H2 = 2 * H;
  at::parallel_for(0, I * D, 8, [&](int64_t lo, int64_t hi) {
    std::vector<T> rhs((size_t)(H2 * D)), coef((size_t)H2);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t il = r / D, a = r % D, i = i0 + il;
      for (int64_t h = 0; h < H; ++h) {
        const T* r1 = R1 + il * r1s0 + h * r1s1 + a * r1s2;
        const T* rbh = rb + (i * H + h) * D;
        std::copy(r1, r1 + D, rhs.data() + h * D);
        std::copy(rbh, rbh + D, rhs.data() + (H + h) * D);
      }
      T* dst = out + (i * D + a) * ld;
      for (int64_t m = 0; m < S; ++m) {
        for (int64_t h = 0; h < H; ++h) {
          coef[h] = A[(h * S + i) * S + m];
          coef[H + h] = U[((h * I + il) * S + m) * D + a];
        }
        T* d = dst + m * D;
        const T* e = m == i ? Ed + (il * D + a) * D : nullptr;
        int64_t b0 = 0;
        for (; b0 + VB <= D; b0 += VB) {
          T acc[VB];
          if (e) {
            for (int64_t x = 0; x < VB; ++x) acc[x] = e[b0 + x];
          } else {
            for (int64_t x = 0; x < VB; ++x) acc[x] = T(0);
          }
          for (int64_t hh = 0; hh < H2; ++hh) {
            const T c = coef[hh];
            const T* rp = rhs.data() + hh * D + b0;
#pragma omp simd
            for (int64_t x = 0; x < VB; ++x) acc[x] += c * rp[x];
          }
#pragma omp simd
          for (int64_t x = 0; x < VB; ++x) d[b0 + x] = acc[x];
        }
        for (; b0 < D; ++b0) {
          T acc = e ? e[b0] : T(0);
          for (int64_t hh = 0; hh < H2; ++hh) acc += coef[hh] * rhs[hh * D + b0];
          d[b0] = acc;
        }
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
