// The extension: the kernels and their Python bindings (selective_scan.cpp), and the inference of a stack of
// Vim blocks registered as a PyTorch operator, torch.ops.dmclip.bimamba_stack. torch.export records that
// operator as one node of the graph (the Meta kernel gives torch.export's fake tensors its output shape), so a
// program exported with it runs the fused kernel wherever this library is loaded (torch.ops.load_library),
// without dmclip's Python code.
#include "selective_scan.cpp"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace dmclip {
namespace {

// a copy of this library loaded into a process that already has the operator (dmclip's own build, and an
// export's copy of it) leaves it to the first one: the dispatcher refuses a second definition, and a refusal
// while the library loads would abort the process
bool defined_here = false;

at::Tensor bimamba_stack_cpu(const at::Tensor& x, at::TensorList params, double eps) {
  return bimamba_stack_fwd(x.contiguous(), params.vec(), eps);
}

at::Tensor bimamba_stack_meta(const at::Tensor& x, at::TensorList params, double eps) {
  TORCH_CHECK(!params.empty() && params.size() % 10 == 0, "params must hold 10 tensors per block");
  TORCH_CHECK(x.dim() == 3, "x must be (batch, L, width)");
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

}  // namespace
}  // namespace dmclip

TORCH_LIBRARY_FRAGMENT(dmclip, m) {
  if (c10::Dispatcher::singleton().findSchema({"dmclip::bimamba_stack", ""}).has_value()) return;
  // params: 10 tensors per block, as bimamba_stack_fwd takes them (norm weight, in_proj, conv weight, conv bias,
  // x_proj, dt_proj, dt bias, A_log, D, out_proj); returns the stack's output, (batch, L, width) like x
  m.def("bimamba_stack(Tensor x, Tensor[] params, float eps) -> Tensor");
  dmclip::defined_here = true;
}

TORCH_LIBRARY_IMPL(dmclip, CPU, m) {
  if (dmclip::defined_here) m.impl("bimamba_stack", &dmclip::bimamba_stack_cpu);
}

TORCH_LIBRARY_IMPL(dmclip, Meta, m) {
  if (dmclip::defined_here) m.impl("bimamba_stack", &dmclip::bimamba_stack_meta);
}
