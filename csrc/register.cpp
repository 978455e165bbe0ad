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
std::tuple<at::Tensor, at::Tensor> flash_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, bool causal, const c10::optional<at::Tensor>& bias,
                                                 int64_t block_m, int64_t block_n);
at::Tensor flash_jvp_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
                         const at::Tensor& lse, const at::Tensor& qd, const at::Tensor& kd, const at::Tensor& vd,
                         double scale, bool causal, const c10::optional<at::Tensor>& bias, int64_t block_m,
                         int64_t block_n);
void step_dense_flash_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& vo, const at::Tensor& oo,
                          const c10::optional<at::Tensor>& L, const at::Tensor& E,
                          const at::Tensor& wvoT, const at::Tensor& wq, const at::Tensor& wk, double eta, double beta,
                          bool causal, at::Tensor out);
// The library's version tag: the Python loader finds the string in the file before loading it (a foreign or stale
// .so is rebuilt, never loaded) and checks the op and every schema below after loading.
int64_t abi_version() { return FASTJAC_CPP_ABI; }
}  // namespace fastjac

#define FJ_STR2(x) #x
#define FJ_STR(x) FJ_STR2(x)
extern "C" __attribute__((used, visibility("default"))) const char fastjac_cpp_abi_tag[] =
    "fastjac-cpp-abi-" FJ_STR(FASTJAC_CPP_ABI) ";";

TORCH_LIBRARY(fastjac, m) {
  m.def("attn_jvp(Tensor A, Tensor q, Tensor k, Tensor v, Tensor o, Tensor qd, Tensor kd, Tensor vd, float beta, "
        "bool causal) -> Tensor");
  m.def("norm_residual_jvp(Tensor T, Tensor R, Tensor? w, Tensor? s, Tensor? gamma, Tensor eta, str kind, "
        "int group) -> Tensor");
  m.def("flash_fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal, Tensor? bias, int block_m, "
        "int block_n) -> (Tensor, Tensor)");
  m.def("flash_jvp(Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor qd, Tensor kd, Tensor vd, "
        "float scale, bool causal, Tensor? bias, int block_m, int block_n) -> Tensor");
  m.def("step_dense_flash_(Tensor q, Tensor k, Tensor vo, Tensor oo, Tensor? L, Tensor E, "
        "Tensor wvoT, Tensor wq, Tensor wk, float eta, float beta, bool causal, Tensor(a!) out) -> ()");
  m.def("abi_version() -> int", &fastjac::abi_version);
  m.def("step_dense_(Tensor A, Tensor R1, Tensor U, Tensor rb, Tensor Ed, Tensor(a!) out, int i0) -> ()");
}

TORCH_LIBRARY_IMPL(fastjac, CPU, m) {
  m.impl("attn_jvp", &fastjac::attn_jvp_cpu);
  m.impl("norm_residual_jvp", &fastjac::norm_residual_jvp_cpu);
  m.impl("step_dense_", &fastjac::step_dense_cpu);
  m.impl("flash_fwd", &fastjac::flash_fwd_cpu);
  m.impl("flash_jvp", &fastjac::flash_jvp_cpu);
  m.impl("step_dense_flash_", &fastjac::step_dense_flash_cpu);
}

