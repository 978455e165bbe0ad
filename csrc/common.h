// Shared helpers of fastjac's CPU kernels: argument checks and a row-major GEMM on the BLAS torch links.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

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

// C[m, n] = alpha * A[m, k] @ op(B) + beta * C, all row-major; op(B) = B[k, n] (ldb) or, with trans_b, the
// transpose of B stored [n, k] (ldb). Leading dimensions are in elements.
template <typename T>
inline void gemm(int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
                 bool trans_b, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  if (blas_available()) {
    // row-major C = A op(B)  <=>  column-major C^T = op(B)^T A^T
    const int M = (int)n, N = (int)m, K = (int)k, LA = (int)ldb, LB = (int)lda, LC = (int)ldc;
    const char ta = trans_b ? 'T' : 'N', tb = 'N';
    if constexpr (std::is_same<T, float>::value) {
      sgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
    } else {
      dgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC);
    }
    return;
  }
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opt);
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

}  // namespace fastjac
