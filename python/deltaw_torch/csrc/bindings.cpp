// SPDX-License-Identifier: MIT
// PyTorch bindings of the deltaw extension: checks each tensor (CPU, float32, 1-D or 2-D)
// and hands its data pointer, shape and strides to dw_kernels.cpp as a deltaw view, so the
// factors PEFT owns are read in place and the outputs are tensors deltaw writes into.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "dw_kernels.hpp"

namespace {

using deltaw_torch::mat;

const char* kind_name(int k) {
  static const char* names[] = {"lokr (w1, w2)", "lokr (w1_a·w1_b, w2)", "lokr (w1, w2_a·w2_b)",
                                "lokr (w1_a·w1_b, w2_a·w2_b)", "miss", "bone_bat", "low_rank", "loha",
                                "ia3 (output)", "ia3 (input)", "adalora", "hira", "delora",
                                "oft", "hra", "boft", "road", "randlora", "shira"};
  return k >= 0 && k < 19 ? names[k] : "unknown";
}

/// A view of t; 1-D tensors are [1, n]. Throws (as a Python ValueError/TypeError) naming
/// the operation and the operand when t is not a CPU float32 matrix.
mat view_of(const torch::Tensor& t, const char* op, const std::string& what) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", what, " is undefined");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", what, " is on ", t.device().str(),
                    "; the deltaw extension evaluates CPU tensors only");
  TORCH_CHECK_TYPE(t.scalar_type() == torch::kFloat32, op, ": ", what, " is ", c10::toString(t.scalar_type()),
                   "; the deltaw extension takes float32 (cast it, or use PEFT's forward for this layer)");
  TORCH_CHECK_VALUE(t.dim() == 1 || t.dim() == 2, op, ": ", what, " has ", t.dim(), " dimensions ",
                    t.sizes(), "; expected a matrix (activations are flattened to [tokens, features] by the caller)");
  mat m;
  m.p = t.data_ptr<float>();
  if (t.dim() == 1) {
    m.rows = 1;
    m.cols = t.size(0);
    m.rs = t.size(0);
    m.cs = t.stride(0);
  } else {
    m.rows = t.size(0);
    m.cols = t.size(1);
    m.rs = t.stride(0);
    m.cs = t.stride(1);
  }
  return m;
}

std::vector<mat> factor_views(int k, const std::vector<torch::Tensor>& fs, const char* op) {
  const int want = deltaw_torch::factor_count(k);
  TORCH_CHECK_VALUE(want >= 0, op, ": unknown update kind ", k);
  TORCH_CHECK_VALUE(int(fs.size()) == want, op, ": ", kind_name(k), " takes ", want, " factors; got ", fs.size());
  std::vector<mat> v;
  for (std::size_t i = 0; i < fs.size(); ++i) v.push_back(view_of(fs[i], op, "factor " + std::to_string(i) + " of " + kind_name(k)));
  return v;
}

/// The integer options and, when given, an index pattern [2, nnz] (int32 or int64 on the CPU; its
/// rows must have unit stride, as PEFT's shira_indices have). `index` must outlive the call.
deltaw_torch::options options_of(const std::vector<std::int64_t>& v, const c10::optional<torch::Tensor>& index,
                                 const char* op) {
  TORCH_CHECK_VALUE(v.size() <= 4, op, ": at most 4 integer options; got ", v.size());
  deltaw_torch::options o;
  for (std::size_t i = 0; i < v.size(); ++i) o.v[i] = v[i];
  if (index && index->defined()) {
    const auto& t = *index;
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": the index pattern is on ", t.device().str(), "; CPU only");
    TORCH_CHECK_TYPE(t.scalar_type() == torch::kInt64 || t.scalar_type() == torch::kInt32, op, ": the index pattern is ",
                     c10::toString(t.scalar_type()), "; expected int32 or int64 (PEFT's shira_indices)");
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == 2, op, ": the index pattern must be [2, nnz]; got ", t.sizes());
    TORCH_CHECK_VALUE(t.size(1) == 0 || t.stride(1) == 1, op, ": the index pattern's rows must be contiguous");
    o.nnz = t.size(1);
    if (t.scalar_type() == torch::kInt32) {
      o.index_bits = 32;
      o.rows = t.data_ptr<std::int32_t>();
      o.cols = t.data_ptr<std::int32_t>() + t.stride(0);
    } else {
      o.rows = t.data_ptr<std::int64_t>();
      o.cols = t.data_ptr<std::int64_t>() + t.stride(0);
    }
  }
  return o;
}

void check_features(const mat& X, std::int64_t want, const char* op, const char* what, const char* dim) {
  TORCH_CHECK_VALUE(X.cols == want, op, ": ", what, " is [", X.rows, ", ", X.cols, "] but the layer's ", dim, " is ", want);
}

torch::Tensor apply(int k, const std::vector<torch::Tensor>& fs, double s, std::int64_t out, std::int64_t in,
                    const torch::Tensor& x, const std::vector<std::int64_t>& opts,
                    const c10::optional<torch::Tensor>& index) {
  constexpr const char* op = "deltaw_torch.apply";
  const auto f = factor_views(k, fs, op);
  const auto opt = options_of(opts, index, op);
  const mat X = view_of(x, op, "the input x");
  check_features(X, in, op, "the input x", "in_features");
  auto y = torch::empty({X.rows, out}, torch::dtype(torch::kFloat32));
  const mat Y = view_of(y, op, "the output");
  {
    pybind11::gil_scoped_release nogil;
    deltaw_torch::apply(k, f.data(), s, out, in, opt, X, Y);
  }
  return y;
}

torch::Tensor apply_transposed(int k, const std::vector<torch::Tensor>& fs, double s, std::int64_t out, std::int64_t in,
                               const torch::Tensor& g, const std::vector<std::int64_t>& opts,
                               const c10::optional<torch::Tensor>& index) {
  constexpr const char* op = "deltaw_torch.apply_transposed";
  const auto f = factor_views(k, fs, op);
  const auto opt = options_of(opts, index, op);
  const mat G = view_of(g, op, "the gradient g");
  check_features(G, out, op, "the gradient g", "out_features");
  auto o = torch::empty({G.rows, in}, torch::dtype(torch::kFloat32));
  const mat O = view_of(o, op, "the output");
  {
    pybind11::gil_scoped_release nogil;
    deltaw_torch::apply_transposed(k, f.data(), s, out, in, opt, G, O);
  }
  return o;
}

/// (dx or None, [grad of each trainable factor or None]).
pybind11::tuple backward(int k, const std::vector<torch::Tensor>& fs, double s, std::int64_t out, std::int64_t in,
                         const torch::Tensor& x, const torch::Tensor& dy, const std::vector<bool>& need, bool need_dx,
                         const std::vector<std::int64_t>& opts, const c10::optional<torch::Tensor>& index) {
  constexpr const char* op = "deltaw_torch.backward";
  const auto f = factor_views(k, fs, op);
  const auto opt = options_of(opts, index, op);
  const int nt = deltaw_torch::trainable_count(k);
  TORCH_CHECK_VALUE(int(need.size()) == nt, op, ": ", kind_name(k), " has ", nt, " trainable factors; got ", need.size(),
                    " flags");
  const mat X = view_of(x, op, "the input x"), dY = view_of(dy, op, "the upstream gradient dy");
  check_features(X, in, op, "the input x", "in_features");
  check_features(dY, out, op, "the upstream gradient dy", "out_features");
  TORCH_CHECK_VALUE(X.rows == dY.rows, op, ": x has ", X.rows, " rows (tokens) but dy has ", dY.rows);
  std::vector<torch::Tensor> grads(nt);
  std::vector<mat> gv(nt);
  for (int i = 0; i < nt; ++i) {
    if (!need[std::size_t(i)]) continue;
    grads[std::size_t(i)] = torch::zeros_like(fs[std::size_t(deltaw_torch::trainable_index(k, i))],
                                                     torch::MemoryFormat::Contiguous);
    gv[std::size_t(i)] = view_of(grads[std::size_t(i)], op, "a gradient");
  }
  torch::Tensor dx;
  mat dX;
  if (need_dx) {
    dx = torch::zeros({X.rows, in}, torch::dtype(torch::kFloat32));
    dX = view_of(dx, op, "dx");
  }
  {
    pybind11::gil_scoped_release nogil;
    deltaw_torch::backward(k, f.data(), s, out, in, opt, X, dY, gv.data(), dX);
  }
  pybind11::list gl;
  for (auto& g : grads) {
    if (g.defined())
      gl.append(g);
    else
      gl.append(pybind11::none());
  }
  return pybind11::make_tuple(dx.defined() ? pybind11::object(pybind11::cast(dx)) : pybind11::none(), gl);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deltaw's structured updates (apply, apply_transposed, VJPs) over PyTorch tensors, zero-copy";
  namespace py = pybind11;
  m.def("apply", &apply, "Y = X·ΔWᵀ (X·(W + ΔW)ᵀ for the kinds that read W)", py::arg("kind"), py::arg("factors"),
        py::arg("scale"), py::arg("out"), py::arg("in"), py::arg("x"), py::arg("opts") = std::vector<std::int64_t>(),
        py::arg("index") = py::none());
  m.def("apply_transposed", &apply_transposed, "O = G·ΔW (G·(W + ΔW) for the kinds that read W)", py::arg("kind"),
        py::arg("factors"), py::arg("scale"), py::arg("out"), py::arg("in"), py::arg("g"),
        py::arg("opts") = std::vector<std::int64_t>(),
        py::arg("index") = py::none());
  m.def("backward", &backward, "(dx, [factor grads]) of apply", py::arg("kind"), py::arg("factors"), py::arg("scale"),
        py::arg("out"), py::arg("in"), py::arg("x"), py::arg("dy"), py::arg("need"), py::arg("need_dx"),
        py::arg("opts") = std::vector<std::int64_t>(),
        py::arg("index") = py::none());
  m.def("factor_count", &deltaw_torch::factor_count);
  m.def("trainable_count", &deltaw_torch::trainable_count);
  m.def("trainable_index", &deltaw_torch::trainable_index);
  m.def("with_base", &deltaw_torch::with_base);
}
