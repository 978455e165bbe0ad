// The fastjac custom ops: schemas (TORCH_LIBRARY) and their CPU kernels. Fake (meta) implementations are
// registered from Python (fastjac/backends/cpp.py), so the ops trace under torch.compile and pass opcheck.
#include <torch/library.h>

#include "common.h"

namespace fastjac {
at::Tensor attn_jvp_cpu(const at::Tensor& A, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& o, const at::Tensor& qd, const at::Tensor& kd, const at::Tensor& vd,
                        double beta, bool causal);
at::Tensor norm_residual_jvp_cpu(const at::Tensor& T, const at::Tensor& R, const c10::optional<at::Tensor>& w,
                                 const c10::optional<at::Tensor>& s, const c10::optional<at::Tensor>& gamma,
                                 const at::Tensor& eta, c10::string_view kind, int64_t group);
void step_dense_cpu(const at::Tensor& A, const at::Tensor& R1, const at::Tensor& U, const at::Tensor& rb,
                    const at::Tensor& Ed, at::Tensor out, int64_t i0);
}  // namespace fastjac

TORCH_LIBRARY(fastjac, m) {
  m.def("attn_jvp(Tensor A, Tensor q, Tensor k, Tensor v, Tensor o, Tensor qd, Tensor kd, Tensor vd, float beta, "
        "bool causal) -> Tensor");
  m.def("norm_residual_jvp(Tensor T, Tensor R, Tensor? w, Tensor? s, Tensor? gamma, Tensor eta, str kind, "
        "int group) -> Tensor");
  m.def("step_dense_(Tensor A, Tensor R1, Tensor U, Tensor rb, Tensor Ed, Tensor(a!) out, int i0) -> ()");
}

TORCH_LIBRARY_IMPL(fastjac, CPU, m) {
  m.impl("attn_jvp", &fastjac::attn_jvp_cpu);
  m.impl("norm_residual_jvp", &fastjac::norm_residual_jvp_cpu);
  m.impl("step_dense_", &fastjac::step_dense_cpu);
}
