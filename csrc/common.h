// Shared helpers of fastjac's CPU kernels: argument checks and a row-major GEMM on the BLAS torch links.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

// Bumped whenever an op schema changes; fastjac/backends/cpp.py ABI must match.
#define FASTJAC_CPP_ABI 2

// Fortran BLAS as exported by the BLAS torch links (MKL in the x86 wheels). Weak: a torch build that exports no
// sgemm_/dgemm_ still loads this library, and gemm() below falls back to at::mm on borrowed buffers.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace fastjac {

#define FJ_CHECK_FLOAT(t, name)                                                                                  \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble, name,                          \
              ": expected float32 or float64, got ", (t).scalar_type())
#define FJ_CHECK_CPU(t, name) TORCH_CHECK((t).device().is_cpu(), name, ": expected a CPU tensor, got ", (t).device())
#define FJ_CHECK_DIM(t, d, name) \
  TORCH_CHECK((t).dim() == (d), name, ": expected ", (d), " dimensions, got shape ", (t).sizes())
#define FJ_CHECK_SAME_DTYPE(t, ref, name) \
  TORCH_CHECK((t).scalar_type() == (ref).scalar_type(), name, ": expected dtype ", (ref).scalar_type(), \
              ", got ", (t).scalar_type())

inline bool blas_available() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// C[m, n] = alpha * op(A) @ op(B) + beta * C, all row-major; op(A) = A[m, k] (lda) or, with trans_a, the transpose
// of A stored [k, m] (lda); op(B) = B[k, n] (ldb) or, with trans_b, the transpose of B stored [n, k] (ldb).
// Leading dimensions are in elements.
template <typename T>
inline void gemm_t(int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, bool trans_a, const T* B,
                   int64_t ldb, bool trans_b, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  if (blas_available()) {
    // row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T
    const int M = (int)n, N = (int)m, K = (int)k, LA = (int)ldb, LB = (int)lda, LC = (int)ldc;
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    if constexpr (std::is_same<T, float>::value) {
      sgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
    } else {
      dgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
    }
    return;
  }
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = trans_a ? at::from_blob(const_cast<T*>(A), {k, m}, {lda, 1}, opt).t()
                         : at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opt);
  at::Tensor b = trans_b ? at::from_blob(const_cast<T*>(B), {n, k}, {ldb, 1}, opt).t()
                         : at::from_blob(const_cast<T*>(B), {k, n}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(C, {m, n}, {ldc, 1}, opt);
  if (beta == T(0)) {
    at::mm_out(c, a, b);
    if (alpha != T(1)) c.mul_(alpha);
  } else {
    c.mul_(beta).addmm_(a, b, 1, alpha);
  }
}

// gemm_t without a transposed A.
template <typename T>
inline void gemm(int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
                 bool trans_b, T beta, T* C, int64_t ldc) {
  gemm_t<T>(m, n, k, alpha, A, lda, false, B, ldb, trans_b, beta, C, ldc);
}

// exp(x) for x <= ~0 (softmax probabilities), written for the vectoriser (no libm call in `omp simd` loops; the
// selects below vectorise only with -fno-trapping-math, which the build sets: without it GCC 12 keeps them scalar):
// x = n ln2 + r, |r| <= ln2/2, Taylor polynomial in r (degree 7 for float: rel. error < 2e-7; degree 13 for double:
// < 1e-16), times 2^n built in the exponent bits. Below the smallest normal (and -inf) it returns exactly 0; NaN
// stays NaN.
inline float exp_simd(float x) {
  const bool under = x < -87.0f;
  float xc = x > 88.0f ? 88.0f : (under ? -87.0f : x);
  const float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = ((int32_t)n + 127) << 23;
  float s;
  __builtin_memcpy(&s, &e, sizeof(s));
  const float y = p * s;
  return under ? 0.0f : (x != x ? x : y);
}

inline double exp_simd(double x) {
  const bool under = x < -708.0;
  double xc = x > 709.0 ? 709.0 : (under ? -708.0 : x);
  const double n = __builtin_floor(xc * 1.4426950408889634074 + 0.5);
  const double r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t e = ((int64_t)n + 1023) << 52;
  double s;
  __builtin_memcpy(&s, &e, sizeof(s));
  const double y = p * s;
  return under ? 0.0 : (x != x ? x : y);
}

}  // namespace fastjac
