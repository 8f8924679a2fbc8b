// fact-ray's native dispatcher: the composed module's kernel calls with no Python on the hot path.
//
// The kernel libraries stay torch-free (they export the C ABIs of fr_abi.h, attention_sm80.cu.in,
// fmha_sm90.cu.in, layernorm.cu.in and rope.cu.in). This one small extension, built once per torch and CUDA version
// (realize/dispatch.py), owns the torch side:
//
//   fact_ray_native::register_kernel(str kernel, str path, str symbol, str family, str dtype, ...) -> ()
//       dlopen `path`, check its ABI version, dlsym the family's entry points and file them under `kernel`
//       (by convention "<library sha256>:<symbol>", so a graph or an AOTInductor package that names it means the
//       same bytes in any process: a fresh process registers the artifact's libraries, then runs).
//   fact_ray_native::gemm(Tensor a, Tensor b, Tensor? bias, Tensor? residual, str kernel) -> Tensor
//   fact_ray_native::attention(Tensor q, Tensor k, Tensor v, bool causal, float scale, str kernel) -> Tensor
//   fact_ray_native::norm(Tensor x, Tensor? weight, Tensor? bias, float eps, str kind, str kernel) -> Tensor
//   fact_ray_native::rope(Tensor x, Tensor cos, Tensor sin, str form, str kernel) -> Tensor
//   fact_ray_native::swiglu(Tensor a, Tensor b_gate, Tensor b_up, Tensor? bias_gate, Tensor? bias_up, str kernel)
//       -> Tensor
//
// CUDA impls (only where FR_DISPATCH_CUDA is defined: a CUDA build of torch) look the kernel up, check the
// operands (dtype, shape, strides, 16-byte pointer alignment: CUTLASS's can_implement does not look at pointers),
// allocate the output and the workspace from the caching allocator, launch on the current stream and turn a
// nonzero status into a c10 error (ValueError for a call the kernel refuses, RuntimeError for a failed launch).
// Meta impls give shapes and strides only, so FakeTensor, torch.compile, torch.export and AOTInductor see the ops
// without running them. CPU impls only say that the kernels run on CUDA tensors (never a silent fallback).
//
// Semantics are those of the Python path (realize/kernel.py GemmKernel, fused.py kernel_fn):
//   gemm: D = act(A @ B + bias) + residual per the configuration's epilogue; A row-major [..., M, K] (every
//     leading dim folds into M when B is 2-D) or, for a "col" A, [..., K, M]; B "col" is [N, K] (an nn.Linear
//     weight), "row" is [K, N]; a B with batch dims must match A's; a 2-D B under a batched col A broadcasts.
//   attention: q, k, v as the graph holds them, [B, H, S, D] (any strides, head dim contiguous); the kernels
//     read them as [B, S, H, D] through strides; the output is a [B, S, H, D] buffer seen as [B, H, S, D].
//     For an FMHA kernel k and v may hold H_kv heads with H % H_kv == 0 (grouped-query attention: query head h
//     reads key/value head h / (H / H_kv)); the head count travels in fr_fmha_args.H_kv.
//   norm: LayerNorm / RMSNorm over the last dim; out is contiguous with x's shape.
//   rope: y = x * cos + rot(x) * sin over x's last dim (form "half": rotate_half; "interleaved": pairs), x of 1 to
//     4 dims with the last contiguous, cos and sin broadcast to x's shape; y has x's layout (empty_like).
//   swiglu: silu(a @ b_gate^T + bias_gate) * (a @ b_up^T + bias_up), a [..., K] dense rows, the weights [F, K]
//     (nn.Linear's), out [..., F]. The kernel (realize/swiglu.py) is one GEMM over the row-interleaved weight
//     [Wg[0]; Wu[0]; ...]; the interleaved copy is made here once per weight tensor and version (PackCache).

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/stack.h>
#include <c10/core/SymBool.h>
#include <torch/library.h>

#ifdef FR_DISPATCH_CUDA
// c10's CUDA headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS and cuSPARSE headers for nothing).
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>
#endif

#include "fr_abi.h"

// Mirrors of the attention, FMHA, norm and rope argument structs (their templates define them inside their TUs, as
// realize/attention.py and norm.py mirror them for ctypes): field order and types must match exactly.
extern "C" {
typedef struct {
  const void* q; const void* k; const void* v; void* o;
  int64_t q_stride_b, q_stride_h, q_stride_s;
  int64_t k_stride_b, k_stride_h, k_stride_s;
  int64_t v_stride_b, v_stride_h, v_stride_s;
  int64_t o_stride_b, o_stride_h, o_stride_s;
  int64_t B, H, S_q, S_k, D;
  float scale;
  int32_t causal;
  int32_t dtype;
  void* workspace; size_t workspace_size;
  void* stream;
} fr_attn_args;

// fmha_sm90.cu.in's fr_fmha_args (ABI 2): fr_attn_args's fields, then the key/value head count. The same bytes as
// its flat C struct (fr_attn_args ends 8-byte aligned), so &base is what the FMHA library reads.
typedef struct {
  fr_attn_args base;
  int64_t H_kv;
} fr_fmha_args;

typedef struct {
  const void* x; void* y; const void* weight; const void* bias;
  const void* residual; void* h;
  int64_t rows, cols;
  int64_t ld_x, ld_y, ld_r, ld_h;
  float eps;
  int32_t kind;
  void* stream;
} fr_norm_args;

typedef struct {
  const void* x; void* y; const void* cos; const void* sin;
  int64_t n[3];
  int64_t x_stride[3], y_stride[3], cos_stride[3], sin_stride[3];
} fr_rope_tensor;

typedef struct {
  fr_rope_tensor t[2];
  int32_t count;
  int64_t D;
  int32_t form;
  void* stream;
} fr_rope_args;
}

namespace fr_dispatch {

// The ABI versions this dispatcher speaks, per family (FR_ABI_VERSION, FR_ATTN_ABI_VERSION, FR_FMHA_ABI_VERSION,
// FR_NORM_ABI_VERSION, FR_ROPE_ABI_VERSION); a library of another version is refused at registration.
constexpr int kGemmAbi = FR_ABI_VERSION;
constexpr int kAttnAbi = 1;
constexpr int kFmhaAbi = 2;
constexpr int kNormAbi = 2;
constexpr int kRopeAbi = 1;
// Dtype codes of the attention and norm ABIs (FR_ATTN_F32/BF16/F16, FR_NORM_* alike) and their refusals.
constexpr int kCodeF32 = 0, kCodeBF16 = 1, kCodeF16 = 2;
constexpr int kEinval = -1, kEnotsup = -2;
constexpr uintptr_t kAlign = 16;

enum class Family { Gemm, Attention, Fmha, Norm, Rope, SwiGlu };

struct Kernel {
  std::string id, path, symbol;
  Family family = Family::Gemm;
  at::ScalarType dtype = at::kFloat;
  bool col_a = false, col_b = true, has_bias = false, has_residual = false;
  int32_t split_k = 1;
  void* handle = nullptr;
  size_t (*gemm_workspace)(const fr_gemm_args*) = nullptr;
  int (*gemm_can_implement)(const fr_gemm_args*) = nullptr;
  int (*gemm_run)(const fr_gemm_args*) = nullptr;
  int (*attn_supports)(int) = nullptr;
  size_t (*attn_workspace)(const fr_attn_args*) = nullptr;
  int (*attn_run)(const fr_attn_args*) = nullptr;
  int (*norm_run)(const fr_norm_args*) = nullptr;
  int (*rope_run)(const fr_rope_args*) = nullptr;
};

// Filled by register_kernel, read on every call. Entries are never removed, so a reference stays valid after the
// lock is released (libraries stay loaded for the life of the process, as ctypes keeps them).
std::shared_mutex g_mutex;
std::unordered_map<std::string, std::unique_ptr<Kernel>> g_kernels;

std::string str(c10::string_view s) { return std::string(s.data(), s.size()); }

// Numbers, shapes and devices reach error messages as strings made here. Streaming a number into c10::str's
// ostringstream from this library crashed on the GPU image (torch 2.11, g++ 13: a segfault inside
// ostream::_M_insert<unsigned long>, the num_put facet of a locale from another libstdc++ copy), so messages hold
// only text: std::to_string and snprintf use no locale facets.
template <typename T>
std::string num(T v) { return std::to_string(v); }
std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}
std::string dims(c10::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}
std::string dev(const c10::Device& d) { return d.str(); }

const char* family_name(Family f) {
  switch (f) {
    case Family::Gemm: return "gemm";
    case Family::Attention: return "attention";
    case Family::Fmha: return "fmha";
    case Family::Norm: return "norm";
    case Family::Rope: return "rope";
    case Family::SwiGlu: return "swiglu";
  }
  return "?";
}

const Kernel& find(c10::string_view id, const char* op, bool attention_op = false, bool gemm_op = false,
                   bool rope_op = false, bool swiglu_op = false) {
  const Kernel* k = nullptr;
  {
    std::shared_lock<std::shared_mutex> lock(g_mutex);
    auto it = g_kernels.find(str(id));
    if (it != g_kernels.end()) k = it->second.get();
  }
  TORCH_CHECK_VALUE(k != nullptr, "fact_ray_native.", op, ": kernel '", str(id), "' is not registered in this "
                    "process (register the artifact's libraries first: fact_ray.realize.dispatch.register_*)");
  bool fits = attention_op ? (k->family == Family::Attention || k->family == Family::Fmha)
                           : gemm_op ? k->family == Family::Gemm
                           : rope_op ? k->family == Family::Rope
                           : swiglu_op ? k->family == Family::SwiGlu : k->family == Family::Norm;
  TORCH_CHECK_VALUE(fits, "fact_ray_native.", op, ": kernel '", k->id, "' is a ", family_name(k->family),
                    " kernel");
  return *k;
}

template <typename Fn>
Fn symbol(void* handle, const std::string& name, const std::string& path) {
  dlerror();
  void* p = dlsym(handle, name.c_str());
  TORCH_CHECK_VALUE(p != nullptr, "fact_ray_native.register_kernel: ", path, " is not a fact-ray kernel library: "
                    "it lacks ", name);
  return reinterpret_cast<Fn>(p);
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK_VALUE(false, "fact_ray_native.register_kernel: dtype '", name, "' is not float32, bfloat16 or float16");
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kCodeF32;
    case at::kBFloat16: return kCodeBF16;
    case at::kHalf: return kCodeF16;
    default: return -1;
  }
}

void register_kernel(c10::string_view kernel, c10::string_view path_sv, c10::string_view symbol_sv,
                     c10::string_view family_sv, c10::string_view dtype_sv, bool col_a, bool col_b, bool bias,
                     bool residual, int64_t split_k) {
  auto k = std::make_unique<Kernel>();
  k->id = str(kernel);
  k->path = str(path_sv);
  k->symbol = str(symbol_sv);
  const std::string family = str(family_sv);
  if (family == "gemm") k->family = Family::Gemm;
  else if (family == "attention") k->family = Family::Attention;
  else if (family == "fmha") k->family = Family::Fmha;
  else if (family == "norm") k->family = Family::Norm;
  else if (family == "rope") k->family = Family::Rope;
  else if (family == "swiglu") k->family = Family::SwiGlu;
  else TORCH_CHECK_VALUE(false, "fact_ray_native.register_kernel: unknown family '", family,
                         "' (gemm, attention, fmha, norm, rope, swiglu)");
  k->dtype = parse_dtype(str(dtype_sv));
  k->col_a = col_a;
  k->col_b = col_b;
  k->has_bias = bias;
  k->has_residual = residual;
  k->split_k = static_cast<int32_t>(split_k < 1 ? 1 : split_k);
  TORCH_CHECK_VALUE(!k->id.empty(), "fact_ray_native.register_kernel: empty kernel id");
  {
    std::shared_lock<std::shared_mutex> lock(g_mutex);
    auto it = g_kernels.find(k->id);
    if (it != g_kernels.end()) {
      // The id names content (library sha256 and symbol): registering it again is a no-op, unless it claims
      // to be something else, which is a caller's bug worth a loud error.
      const Kernel& old = *it->second;
      TORCH_CHECK_VALUE(old.family == k->family && old.symbol == k->symbol && old.dtype == k->dtype &&
                        old.col_a == k->col_a && old.col_b == k->col_b && old.has_bias == k->has_bias &&
                        old.has_residual == k->has_residual && old.split_k == k->split_k,
                        "fact_ray_native.register_kernel: '", k->id, "' is already registered as another kernel");
      return;
    }
  }
  dlerror();
  void* handle = dlopen(k->path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    TORCH_CHECK_VALUE(false, "fact_ray_native.register_kernel: cannot load ", k->path, ": ",
                      why ? why : "unknown dlopen error");
  }
  try {
    auto version = symbol<int (*)(void)>(handle, "fr_abi_version", k->path)();
    // SwiGLU libraries speak the GEMM ABI (fr_abi.h) with N = 2F.
    int want = (k->family == Family::Gemm || k->family == Family::SwiGlu) ? kGemmAbi
             : k->family == Family::Attention ? kAttnAbi
             : k->family == Family::Fmha ? kFmhaAbi : k->family == Family::Norm ? kNormAbi : kRopeAbi;
    TORCH_CHECK_VALUE(version == want, "fact_ray_native.register_kernel: ", k->path, " speaks ",
                      family_name(k->family), " ABI version ", num(version), ", this dispatcher speaks ", num(want),
                      ": rebuild it from the current templates");
    switch (k->family) {
      case Family::Gemm:
      case Family::SwiGlu:
        k->gemm_workspace = symbol<size_t (*)(const fr_gemm_args*)>(handle, k->symbol + "_workspace", k->path);
        k->gemm_can_implement = symbol<int (*)(const fr_gemm_args*)>(handle, k->symbol + "_can_implement", k->path);
        k->gemm_run = symbol<int (*)(const fr_gemm_args*)>(handle, k->symbol + "_run", k->path);
        break;
      case Family::Attention:
      case Family::Fmha: {
        const std::string prefix = k->family == Family::Fmha ? "fr_fmha" : "fr_attn";
        k->attn_supports = symbol<int (*)(int)>(handle, prefix + "_supports", k->path);
        k->attn_workspace = symbol<size_t (*)(const fr_attn_args*)>(handle, prefix + "_workspace", k->path);
        k->attn_run = symbol<int (*)(const fr_attn_args*)>(handle, prefix + "_run", k->path);
        TORCH_CHECK_VALUE(k->attn_supports(dtype_code(k->dtype)) == 1, "fact_ray_native.register_kernel: ",
                          k->path, " holds no ", family_name(k->family), " kernel for ", str(dtype_sv));
        break;
      }
      case Family::Norm: {
        // one run function per launch shape: the symbol names it
        k->norm_run = symbol<int (*)(const fr_norm_args*)>(handle, k->symbol, k->path);
        int element = symbol<int (*)(void)>(handle, "fr_norm_element", k->path)();
        TORCH_CHECK_VALUE(element == dtype_code(k->dtype), "fact_ray_native.register_kernel: ", k->path,
                          " normalises element code ", num(element), ", not ", str(dtype_sv));
        break;
      }
      case Family::Rope: {
        k->rope_run = symbol<int (*)(const fr_rope_args*)>(handle, k->symbol, k->path);
        int element = symbol<int (*)(void)>(handle, "fr_rope_element", k->path)();
        TORCH_CHECK_VALUE(element == dtype_code(k->dtype), "fact_ray_native.register_kernel: ", k->path,
                          " rotates element code ", num(element), ", not ", str(dtype_sv));
        break;
      }
    }
  } catch (...) {
    dlclose(handle);
    throw;
  }
  k->handle = handle;
  std::unique_lock<std::shared_mutex> lock(g_mutex);
  g_kernels.emplace(k->id, std::move(k));  // a racing registration of the same id keeps the first
}

bool is_registered(c10::string_view kernel) {
  std::shared_lock<std::shared_mutex> lock(g_mutex);
  return g_kernels.count(str(kernel)) > 0;
}

// --------------------------------------------------------------------------------------------- shapes

// The GEMM's output shape for A's and B's sizes (IntArrayRef or SymIntArrayRef), checking what shapes alone decide.
template <typename Sizes, typename Int = typename Sizes::value_type>
std::vector<Int> gemm_out_shape(const Kernel& k, Sizes a, Sizes b) {
  TORCH_CHECK_VALUE(a.size() >= 2 && b.size() >= 2, "fact_ray_native.gemm: A and B need at least 2 dims, got ",
                    num(a.size()), " and ", num(b.size()));
  TORCH_CHECK_VALUE(b.size() == 2 || b.size() == a.size(), "fact_ray_native.gemm: B of ", num(b.size()),
                    " dims against A of ", num(a.size()), " (B is 2-D or has A's batch dims)");
  const size_t na = a.size(), nb = b.size();
  const Int& ka = k.col_a ? a[na - 2] : a[na - 1];
  const Int& kb = k.col_b ? b[nb - 1] : b[nb - 2];
  const Int& n = k.col_b ? b[nb - 2] : b[nb - 1];
  TORCH_SYM_CHECK(c10::SymInt(ka).sym_eq(c10::SymInt(kb)), "fact_ray_native.gemm: A's K and B's K differ");
  std::vector<Int> out(a.begin(), a.end() - (k.col_a ? 2 : 1));
  if (k.col_a) out.push_back(a[na - 1]);
  out.push_back(n);
  return out;
}

void check_kernel_dtype(const Kernel& k, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == k.dtype, "fact_ray_native.", op, ": ", name, " is ", c10::toString(t.scalar_type()),
                    ", kernel '", k.id, "' takes ", c10::toString(k.dtype));
}

at::Tensor gemm_meta(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, c10::string_view kernel) {
  const Kernel& k = find(kernel, "gemm", false, true);
  check_kernel_dtype(k, a, "gemm", "A");
  check_kernel_dtype(k, b, "gemm", "B");
  TORCH_CHECK_VALUE(bias.has_value() == k.has_bias, "fact_ray_native.gemm: kernel '", k.id, "' ",
                    k.has_bias ? "needs" : "takes no", " bias");
  TORCH_CHECK_VALUE(residual.has_value() == k.has_residual, "fact_ray_native.gemm: kernel '", k.id, "' ",
                    k.has_residual ? "needs" : "takes no", " residual");
  return at::empty_symint(gemm_out_shape(k, a.sym_sizes(), b.sym_sizes()), a.options());
}

at::Tensor attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                          c10::string_view kernel) {
  const Kernel& kk = find(kernel, "attention", true);
  check_kernel_dtype(kk, q, "attention", "q");
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fact_ray_native.attention: q, k, v must be "
                    "4-D [B, H, S, D]");
  auto s = q.sym_sizes();  // [B, H, S, D] over a [B, S, H, D] buffer
  const c10::SymInt& B = s[0]; const c10::SymInt& H = s[1]; const c10::SymInt& S = s[2]; const c10::SymInt& D = s[3];
  return at::empty_strided_symint({B, H, S, D}, {S * H * D, D, H * D, 1}, q.options());
}

at::Tensor norm_meta(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, double eps, c10::string_view kind,
                     c10::string_view kernel) {
  const Kernel& k = find(kernel, "norm");
  check_kernel_dtype(k, x, "norm", "x");
  TORCH_CHECK_VALUE(str(kind) == "layernorm" || str(kind) == "rmsnorm", "fact_ray_native.norm: kind '", str(kind),
                    "' is not layernorm or rmsnorm");
  return at::empty_symint(x.sym_sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

void check_rope_form(c10::string_view form) {
  TORCH_CHECK_VALUE(str(form) == "half" || str(form) == "interleaved", "fact_ray_native.rope: form '", str(form),
                    "' is not half or interleaved");
}

at::Tensor rope_meta(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, c10::string_view form,
                     c10::string_view kernel) {
  const Kernel& k = find(kernel, "rope", false, false, true);
  check_kernel_dtype(k, x, "rope", "x");
  check_rope_form(form);
  return at::empty_like(x);  // x's layout, as the CUDA impl writes it
}

// [..., F] for a [..., K] and [F, K] weights, checking what shapes alone decide.
template <typename Sizes, typename Int = typename Sizes::value_type>
std::vector<Int> swiglu_out_shape(Sizes a, Sizes gate, Sizes up) {
  TORCH_CHECK_VALUE(a.size() >= 1 && gate.size() == 2 && up.size() == 2, "fact_ray_native.swiglu: a [..., K] and "
                    "weights [F, K] expected, got ", num(a.size()), "-D a, ", num(gate.size()), "-D and ",
                    num(up.size()), "-D weights");
  TORCH_SYM_CHECK(c10::SymInt(gate[0]).sym_eq(c10::SymInt(up[0])), "fact_ray_native.swiglu: gate and up weights "
                  "have different F");
  TORCH_SYM_CHECK(c10::SymInt(gate[1]).sym_eq(c10::SymInt(up[1])), "fact_ray_native.swiglu: gate and up weights "
                  "have different K");
  TORCH_SYM_CHECK(c10::SymInt(a[a.size() - 1]).sym_eq(c10::SymInt(gate[1])), "fact_ray_native.swiglu: a's K and "
                  "the weights' K differ");
  std::vector<Int> out(a.begin(), a.end() - 1);
  out.push_back(gate[0]);
  return out;
}

at::Tensor swiglu_meta(const at::Tensor& a, const at::Tensor& b_gate, const at::Tensor& b_up,
                       const std::optional<at::Tensor>& bias_gate, const std::optional<at::Tensor>& bias_up,
                       c10::string_view kernel) {
  const Kernel& k = find(kernel, "swiglu", false, false, false, true);
  check_kernel_dtype(k, a, "swiglu", "a");
  check_kernel_dtype(k, b_gate, "swiglu", "b_gate");
  check_kernel_dtype(k, b_up, "swiglu", "b_up");
  // One kernel serves both: the bias pointer is an argument (null: none).
  TORCH_CHECK_VALUE(bias_gate.has_value() == bias_up.has_value(), "fact_ray_native.swiglu: takes both biases or "
                    "neither");
  return at::empty_symint(swiglu_out_shape(a.sym_sizes(), b_gate.sym_sizes(), b_up.sym_sizes()), a.options());
}

// --------------------------------------------------------------------------------------------- CPU: refuse

at::Tensor gemm_cpu(const at::Tensor& a, const at::Tensor&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, c10::string_view) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "fact_ray_native.gemm runs on cuda tensors, got ", dev(a.device()));
}
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor&, const at::Tensor&, bool, double, c10::string_view) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "fact_ray_native.attention runs on cuda tensors, got ", dev(q.device()));
}
at::Tensor norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                    c10::string_view, c10::string_view) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "fact_ray_native.norm runs on cuda tensors, got ", dev(x.device()));
}
at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "fact_ray_native.rope runs on cuda tensors, got ", dev(x.device()));
}

at::Tensor swiglu_cpu(const at::Tensor& a, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                      const std::optional<at::Tensor>&, c10::string_view) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "fact_ray_native.swiglu runs on cuda tensors, got ", dev(a.device()));
}

// --------------------------------------------------------------------------------------------- CUDA

#ifdef FR_DISPATCH_CUDA

// `contiguous` and `aligned` for the GEMMs (CUTLASS reads rows through the leading dims we pass and vectorises on
// the pointers without checking them); the attention and norm kernels check alignment themselves (a refusal, or
// a scalar path), so they are not asked.
void check_operand(const Kernel& k, const at::Tensor& t, const at::Tensor& first, const char* op, const char* name,
                   bool contiguous, bool aligned = false) {
  check_kernel_dtype(k, t, op, name);
  TORCH_CHECK_VALUE(t.device() == first.device(), "fact_ray_native.", op, ": ", name, " is on ", dev(t.device()), ", ",
                    "the first operand on ", dev(first.device()));
  TORCH_CHECK_VALUE(!contiguous || t.is_contiguous(), "fact_ray_native.", op, ": ", name, " is not contiguous "
                    "(stride ", dims(t.strides()), ")");
  TORCH_CHECK_VALUE(!aligned || reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlign == 0, "fact_ray_native.", op, ": ", name,
                    " is not ", num(kAlign), "-byte aligned");
}

int sm_count(c10::DeviceIndex device) {
  // Persistent 3.x kernels query the SM count on every call when given 0: ask once per device.
  static std::array<std::atomic<int>, 256> counts{};
  const auto i = static_cast<size_t>(device) & 255;
  int n = counts[i].load(std::memory_order_relaxed);
  if (n == 0) {
    TORCH_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
                "fact_ray_native: cannot read the SM count of cuda:", num(static_cast<int>(device)));
    counts[i].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Points `args` at `nbytes` of workspace from the caching allocator (none for 0) and at the current stream. The
// returned DataPtr owns the workspace: freed back to the cache when the caller returns, the allocator orders its
// reuse after the launch on this stream, as for any tensor.
template <typename Args>
at::DataPtr with_workspace_and_stream(Args& args, size_t nbytes, c10::DeviceIndex device) {
  at::DataPtr workspace;
  if (nbytes) {
    workspace = c10::cuda::CUDACachingAllocator::get()->allocate(nbytes);
    args.workspace = workspace.get();
    args.workspace_size = nbytes;
  }
  args.stream = c10::cuda::getCurrentCUDAStream(device).stream();
  return workspace;
}

at::Tensor gemm_cuda(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual, c10::string_view kernel) {
  const Kernel& k = find(kernel, "gemm", false, true);
  check_operand(k, a, a, "gemm", "A", true, true);
  check_operand(k, b, a, "gemm", "B", true, true);
  std::vector<int64_t> out_shape = gemm_out_shape(k, a.sizes(), b.sizes());
  const int64_t na = a.dim(), nb = b.dim();
  const int64_t K = k.col_a ? a.size(na - 2) : a.size(na - 1);
  const int64_t N = k.col_b ? b.size(nb - 2) : b.size(nb - 1);
  int64_t M, L = 1;
  bool broadcast_b = nb == 2;
  if (!k.col_a && nb == 2) {
    M = 1;  // every leading dim folds into M: a Linear over [B, T, C] is one [B*T, C] GEMM
    for (int64_t i = 0; i < na - 1; ++i) M *= a.size(i);
  } else {
    M = k.col_a ? a.size(na - 1) : a.size(na - 2);
    for (int64_t i = 0; i < na - 2; ++i) L *= a.size(i);
    if (nb > 2) {
      TORCH_CHECK_VALUE(a.sizes().slice(0, na - 2) == b.sizes().slice(0, nb - 2), "fact_ray_native.gemm: A's "
                        "batch dims ", dims(a.sizes().slice(0, na - 2)), " differ from B's ",
                        dims(b.sizes().slice(0, nb - 2)));
    }
  }
  if (bias.has_value() != k.has_bias || residual.has_value() != k.has_residual) {
    TORCH_CHECK_VALUE(false, "fact_ray_native.gemm: kernel '", k.id, "' ", k.has_bias ? "needs" : "takes no",
                      " bias and ", k.has_residual ? "needs" : "takes no", " residual");
  }
  if (bias.has_value()) {
    check_operand(k, *bias, a, "gemm", "bias", true, true);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "fact_ray_native.gemm: bias has shape ",
                      dims(bias->sizes()), ", expected [", num(N), "]");
  }
  if (residual.has_value()) {
    check_operand(k, *residual, a, "gemm", "residual", true, true);
    TORCH_CHECK_VALUE(residual->sizes() == c10::IntArrayRef(out_shape), "fact_ray_native.gemm: residual has "
                      "shape ", dims(residual->sizes()), ", expected ", dims(out_shape));
  }
  c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty(out_shape, a.options());
  if (out.numel() == 0) return out;
  fr_gemm_args args{};
  args.A = a.data_ptr();
  args.B = b.data_ptr();
  args.C = residual.has_value() ? residual->data_ptr() : nullptr;
  args.D = out.data_ptr();
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  args.M = M; args.N = N; args.K = K; args.L = L;
  args.lda = k.col_a ? M : K;
  args.ldb = k.col_b ? K : N;
  args.ldc = residual.has_value() ? N : 0;
  args.ldd = N;
  args.batch_stride_a = M * K;
  args.batch_stride_b = broadcast_b ? 0 : N * K;
  args.batch_stride_c = residual.has_value() ? M * N : 0;
  args.batch_stride_d = M * N;
  args.alpha = 1.0f;
  args.beta = residual.has_value() ? 1.0f : 0.0f;
  args.split_k = k.split_k;
  args.sm_count = sm_count(a.device().index());
  at::DataPtr workspace = with_workspace_and_stream(args, k.gemm_workspace(&args), a.device().index());
  const int status = k.gemm_run(&args);
  if (status != 0) {
    const int can = k.gemm_can_implement(&args);
    TORCH_CHECK_VALUE(can == 0, "fact_ray_native.gemm: kernel '", k.id, "' cannot implement M=", num(M), " N=",
                      num(N), " K=", num(K), " L=", num(L), " (can_implement status ", num(can), ")");
    TORCH_CHECK(false, "fact_ray_native.gemm: kernel '", k.id, "' failed to launch with status ", num(status),
                " (M=", num(M), " N=", num(N), " K=", num(K), " L=", num(L), ")");
  }
  return out;
}

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                          c10::string_view kernel) {
  const Kernel& kk = find(kernel, "attention", true);
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fact_ray_native.attention: q, k, v must be "
                    "4-D [B, H, S, D]");
  const at::Tensor* named[] = {&q, &k, &v};
  const char* names[] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    check_operand(kk, *named[i], q, "attention", names[i], false);
    TORCH_CHECK_VALUE(named[i]->stride(3) == 1, "fact_ray_native.attention: ", names[i], "'s head dim must be "
                      "contiguous (stride ", dims(named[i]->strides()), ")");
  }
  const int64_t B = q.size(0), H = q.size(1), S_q = q.size(2), D = q.size(3), S_k = k.size(2), H_kv = k.size(1);
  // Only the FMHA reads grouped key/value heads (example 41's kernel indexes k and v by the query head).
  const bool grouped_ok = kk.family == Family::Fmha && H_kv > 0 && H % H_kv == 0;
  TORCH_CHECK_VALUE(k.sizes() == at::IntArrayRef({B, H_kv, S_k, D}) && v.sizes() == k.sizes() &&
                        (H_kv == H || grouped_ok),
                    "fact_ray_native.attention: k ", dims(k.sizes()), " and v ", dims(v.sizes()), " do not match q ",
                    dims(q.sizes()));
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor o = at::empty_strided({B, H, S_q, D}, {S_q * H * D, D, H * D, 1}, q.options());
  fr_fmha_args fa{};
  fa.H_kv = H_kv;  // read by FMHA libraries only; example 41's stop at fr_attn_args
  fr_attn_args& a = fa.base;
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr(); a.o = o.data_ptr();
  a.q_stride_b = q.stride(0); a.q_stride_h = q.stride(1); a.q_stride_s = q.stride(2);
  a.k_stride_b = k.stride(0); a.k_stride_h = k.stride(1); a.k_stride_s = k.stride(2);
  a.v_stride_b = v.stride(0); a.v_stride_h = v.stride(1); a.v_stride_s = v.stride(2);
  a.o_stride_b = o.stride(0); a.o_stride_h = o.stride(1); a.o_stride_s = o.stride(2);
  a.B = B; a.H = H; a.S_q = S_q; a.S_k = S_k; a.D = D;
  a.scale = static_cast<float>(scale);
  a.causal = causal ? 1 : 0;
  a.dtype = dtype_code(kk.dtype);
  at::DataPtr workspace = with_workspace_and_stream(a, kk.attn_workspace(&a), q.device().index());
  const int status = kk.attn_run(&a);
  TORCH_CHECK_VALUE(status != kEinval && status != kEnotsup, "fact_ray_native.attention: kernel '", kk.id,
                    "' refused B=", num(B), " H=", num(H), " H_kv=", num(H_kv), " S_q=", num(S_q), " S_k=", num(S_k),
                    " D=", num(D),
                    " strides q=", dims(q.strides()),
                    status == kEinval ? " (invalid)" : " (unsupported)");
  TORCH_CHECK(status == 0, "fact_ray_native.attention: kernel '", kk.id, "' failed with CUDA error ", num(status));
  return o;
}

at::Tensor norm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, double eps, c10::string_view kind,
                     c10::string_view kernel) {
  const Kernel& k = find(kernel, "norm");
  const std::string kind_s = str(kind);
  const bool rms = kind_s == "rmsnorm";
  TORCH_CHECK_VALUE(rms || kind_s == "layernorm", "fact_ray_native.norm: kind '", str(kind),
                    "' is not layernorm or rmsnorm");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, "fact_ray_native.norm: x must have a non-empty last dim, got ",
                    dims(x.sizes()));
  check_operand(k, x, x, "norm", "x", false);
  const int64_t cols = x.size(-1);
  const std::optional<at::Tensor>* named[] = {&weight, &bias};
  const char* names[] = {"weight", "bias"};
  for (int i = 0; i < 2; ++i) {
    if (!named[i]->has_value()) continue;
    const at::Tensor& t = **named[i];
    check_operand(k, t, x, "norm", names[i], true);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == cols, "fact_ray_native.norm: ", names[i], " has shape ",
                      dims(t.sizes()), ", expected [", num(cols), "]");
  }
  int64_t ld_x = cols, rows;
  if (x.dim() == 2 && x.stride(1) == 1 && x.stride(0) >= cols) {
    ld_x = x.stride(0);  // a strided row view (a column slice) folds into ld_x
    rows = x.size(0);
  } else {
    TORCH_CHECK_VALUE(x.is_contiguous(), "fact_ray_native.norm: x of shape ", dims(x.sizes()), " and stride ",
                      dims(x.strides()), " is not rows");
    rows = x.numel() / cols;
  }
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows == 0) return y;
  fr_norm_args a{};
  a.x = x.data_ptr(); a.y = y.data_ptr();
  a.residual = nullptr; a.h = nullptr; a.ld_r = 0; a.ld_h = 0;
  a.weight = weight.has_value() ? weight->data_ptr() : nullptr;
  a.bias = !rms && bias.has_value() ? bias->data_ptr() : nullptr;
  a.rows = rows; a.cols = cols; a.ld_x = ld_x; a.ld_y = cols;
  a.eps = static_cast<float>(eps);
  a.kind = rms ? 1 : 0;
  a.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int status = k.norm_run(&a);
  TORCH_CHECK_VALUE(status != kEinval, "fact_ray_native.norm: kernel '", k.id, "' refused ", str(kind), " rows=",
                    num(rows), " cols=", num(cols), " eps=", num(eps));
  TORCH_CHECK(status == 0, "fact_ray_native.norm: kernel '", k.id, "' failed with CUDA error ", num(status));
  return y;
}

// One tensor of the rope ABI: x viewed as [n0, n1, n2, D] (leading 1s for fewer dims), cos and sin expanded to
// x's shape (zero strides where they broadcast).
void fill_rope_tensor(fr_rope_tensor& t, const at::Tensor& x, const at::Tensor& y, const at::Tensor& cos,
                      const at::Tensor& sin) {
  const at::Tensor c = cos.expand(x.sizes()), s = sin.expand(x.sizes());
  const int64_t pad = 4 - x.dim();
  for (int j = 0; j < 3; ++j) {
    const int64_t d = j - pad;  // x's dim for slot j; negative: a leading 1
    t.n[j] = d < 0 ? 1 : x.size(d);
    t.x_stride[j] = d < 0 ? 0 : x.stride(d);
    t.y_stride[j] = d < 0 ? 0 : y.stride(d);
    t.cos_stride[j] = d < 0 ? 0 : c.stride(d);
    t.sin_stride[j] = d < 0 ? 0 : s.stride(d);
  }
  t.x = x.data_ptr(); t.y = y.data_ptr(); t.cos = cos.data_ptr(); t.sin = sin.data_ptr();
}

at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, c10::string_view form,
                     c10::string_view kernel) {
  const Kernel& k = find(kernel, "rope", false, false, true);
  check_rope_form(form);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.dim() <= 4 && x.size(-1) % 2 == 0, "fact_ray_native.rope: x must have 1 to "
                    "4 dims and an even last dim, got ", dims(x.sizes()));
  const at::Tensor* named[] = {&x, &cos, &sin};
  const char* names[] = {"x", "cos", "sin"};
  for (int i = 0; i < 3; ++i) {
    check_operand(k, *named[i], x, "rope", names[i], false);
    TORCH_CHECK_VALUE(named[i]->dim() <= x.dim() && named[i]->size(-1) == x.size(-1) &&
                      (named[i]->size(-1) == 1 || named[i]->stride(-1) == 1), "fact_ray_native.rope: ", names[i],
                      " of shape ", dims(named[i]->sizes()), " and stride ", dims(named[i]->strides()),
                      " is not rows of x's last dim ", num(x.size(-1)));
  }
  for (int i = 1; i < 3; ++i) {
    const at::Tensor& t = *named[i];
    for (int64_t d = 1; d <= t.dim(); ++d) {
      TORCH_CHECK_VALUE(t.size(-d) == 1 || t.size(-d) == x.size(-d), "fact_ray_native.rope: ", names[i], " ",
                        dims(t.sizes()), " does not broadcast to x ", dims(x.sizes()));
    }
  }
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  fr_rope_args a{};
  fill_rope_tensor(a.t[0], x, y, cos, sin);
  a.count = 1;
  a.D = x.size(-1);
  a.form = str(form) == "half" ? 0 : 1;
  a.stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int status = k.rope_run(&a);
  TORCH_CHECK_VALUE(status != kEinval, "fact_ray_native.rope: kernel '", k.id, "' refused ", str(form),
                    " rope of ", dims(x.sizes()));
  TORCH_CHECK(status == 0, "fact_ray_native.rope: kernel '", k.id, "' failed with CUDA error ", num(status));
  return y;
}

// The interleaved weight (and bias) of a SwiGLU, made once per (gate, up, biases) and kept while those very
// tensors live unmodified: an entry holds weak references to their TensorImpls (a freed weight frees its copy at the
// next lookup, and a new tensor at a reused address is not mistaken for it) and their version counters (an
// in-place update makes it again). One more copy of the gate and up weights in GPU memory is the price of never
// writing the [M, 2F] intermediate. Tensors without a version counter (inference tensors) and calls under CUDA
// graph capture (the copy is then part of the graph) are packed on every call, never cached.
class PackCache {
 public:
  struct Packed {
    at::Tensor weight, bias;  // bias undefined when the SwiGLU has none
  };

  Packed get(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& bias_gate,
             const std::optional<at::Tensor>& bias_up, cudaStream_t stream) {
    const at::Tensor* src[4] = {&gate, &up, bias_gate ? &*bias_gate : nullptr, bias_up ? &*bias_up : nullptr};
    bool cacheable = true;
    for (const at::Tensor* t : src) cacheable &= t == nullptr || !t->is_inference();
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cacheable &= cudaStreamIsCapturing(stream, &capture) == cudaSuccess && capture == cudaStreamCaptureStatusNone;
    if (!cacheable) return pack(src);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->expired()) {
        it = entries_.erase(it);
        continue;
      }
      if (it->holds(src)) return it->packed;
      ++it;
    }
    Entry e;
    for (int i = 0; i < 4; ++i) {
      if (src[i] == nullptr) continue;
      e.refs[i].emplace(src[i]->getIntrusivePtr());
      e.versions[i] = src[i]->_version();
    }
    e.packed = pack(src);
    entries_.push_back(e);
    return e.packed;
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    std::optional<Weak> refs[4];  // empty where the operand is absent
    int64_t versions[4] = {0, 0, 0, 0};
    Packed packed;

    bool expired() const {
      for (const auto& r : refs) {
        if (r && r->expired()) return true;
      }
      return false;
    }
    bool holds(const at::Tensor* const src[4]) const {
      for (int i = 0; i < 4; ++i) {
        if (refs[i].has_value() != (src[i] != nullptr)) return false;
        if (!refs[i]) continue;
        if (refs[i]->_unsafe_get_target() != src[i]->unsafeGetTensorImpl()) return false;
        if (versions[i] != src[i]->_version()) return false;
      }
      return true;
    }
  };

  static Packed pack(const at::Tensor* const src[4]) {
    const int64_t F = src[0]->size(0);
    Packed p;
    p.weight = at::stack({*src[0], *src[1]}, 1).reshape({2 * F, src[0]->size(1)});
    if (src[2] != nullptr) p.bias = at::stack({*src[2], *src[3]}, 1).reshape({2 * F});
    return p;
  }

  std::mutex mutex_;
  std::vector<Entry> entries_;
};

PackCache g_packs;

at::Tensor swiglu_cuda(const at::Tensor& a, const at::Tensor& b_gate, const at::Tensor& b_up,
                       const std::optional<at::Tensor>& bias_gate, const std::optional<at::Tensor>& bias_up,
                       c10::string_view kernel) {
  const Kernel& k = find(kernel, "swiglu", false, false, false, true);
  check_operand(k, a, a, "swiglu", "a", true, true);
  check_operand(k, b_gate, a, "swiglu", "b_gate", true, true);
  check_operand(k, b_up, a, "swiglu", "b_up", true, true);
  std::vector<int64_t> out_shape = swiglu_out_shape(a.sizes(), b_gate.sizes(), b_up.sizes());
  TORCH_CHECK_VALUE(bias_gate.has_value() == bias_up.has_value(), "fact_ray_native.swiglu: takes both biases or "
                    "neither");
  const int64_t F = b_gate.size(0), K = b_gate.size(1);
  const std::optional<at::Tensor>* biases[] = {&bias_gate, &bias_up};
  const char* bias_names[] = {"bias_gate", "bias_up"};
  for (int i = 0; i < 2; ++i) {
    if (!biases[i]->has_value()) continue;
    check_operand(k, **biases[i], a, "swiglu", bias_names[i], true, true);
    TORCH_CHECK_VALUE((*biases[i])->dim() == 1 && (*biases[i])->size(0) == F, "fact_ray_native.swiglu: ",
                      bias_names[i], " has shape ", dims((*biases[i])->sizes()), ", expected [", num(F), "]");
  }
  c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty(out_shape, a.options());
  if (out.numel() == 0) return out;
  const int64_t M = out.numel() / F;
  fr_gemm_args args{};
  at::DataPtr workspace;  // set below, after the stream is known
  args.stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  PackCache::Packed packed =
      g_packs.get(b_gate, b_up, bias_gate, bias_up, static_cast<cudaStream_t>(args.stream));
  args.A = a.data_ptr();
  args.B = packed.weight.data_ptr();
  args.C = nullptr;
  args.D = out.data_ptr();
  args.bias = packed.bias.defined() ? packed.bias.data_ptr() : nullptr;
  args.M = M; args.N = 2 * F; args.K = K; args.L = 1;
  args.lda = K; args.ldb = K; args.ldc = 0; args.ldd = F;
  args.batch_stride_a = M * K; args.batch_stride_b = 0; args.batch_stride_c = 0; args.batch_stride_d = M * F;
  args.alpha = 1.0f; args.beta = 0.0f;
  args.split_k = 1;
  args.sm_count = sm_count(a.device().index());
  workspace = with_workspace_and_stream(args, k.gemm_workspace(&args), a.device().index());
  const int status = k.gemm_run(&args);
  if (status != 0) {
    const int can = k.gemm_can_implement(&args);
    TORCH_CHECK_VALUE(can == 0, "fact_ray_native.swiglu: kernel '", k.id, "' cannot implement M=", num(M), " F=",
                      num(F), " K=", num(K), " (can_implement status ", num(can), ")");
    TORCH_CHECK(false, "fact_ray_native.swiglu: kernel '", k.id, "' failed to launch with status ", num(status),
                " (M=", num(M), " F=", num(F), " K=", num(K), ")");
  }
  return out;
}

#endif  // FR_DISPATCH_CUDA

}  // namespace fr_dispatch

TORCH_LIBRARY(fact_ray_native, m) {
  m.def("register_kernel(str kernel, str path, str symbol, str family, str dtype, bool col_a=False, "
        "bool col_b=True, bool bias=False, bool residual=False, int split_k=1) -> ()",
        &fr_dispatch::register_kernel);
  m.def("is_registered(str kernel) -> bool", &fr_dispatch::is_registered);
  // 1 when this build carries the CUDA impls, 0 for a CPU-only torch (schemas and Meta impls only).
  m.def("has_cuda() -> bool", []() -> bool {
#ifdef FR_DISPATCH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("gemm(Tensor a, Tensor b, Tensor? bias, Tensor? residual, str kernel) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal, float scale, str kernel) -> Tensor");
  m.def("norm(Tensor x, Tensor? weight, Tensor? bias, float eps, str kind, str kernel) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, str form, str kernel) -> Tensor");
  m.def("swiglu(Tensor a, Tensor b_gate, Tensor b_up, Tensor? bias_gate, Tensor? bias_up, str kernel) -> Tensor");
}

TORCH_LIBRARY_IMPL(fact_ray_native, Meta, m) {
  m.impl("gemm", &fr_dispatch::gemm_meta);
  m.impl("attention", &fr_dispatch::attention_meta);
  m.impl("norm", &fr_dispatch::norm_meta);
  m.impl("rope", &fr_dispatch::rope_meta);
  m.impl("swiglu", &fr_dispatch::swiglu_meta);
}

TORCH_LIBRARY_IMPL(fact_ray_native, CPU, m) {
  m.impl("gemm", &fr_dispatch::gemm_cpu);
  m.impl("attention", &fr_dispatch::attention_cpu);
  m.impl("norm", &fr_dispatch::norm_cpu);
  m.impl("rope", &fr_dispatch::rope_cpu);
  m.impl("swiglu", &fr_dispatch::swiglu_cpu);
}

#ifdef FR_DISPATCH_CUDA
TORCH_LIBRARY_IMPL(fact_ray_native, CUDA, m) {
  m.impl("gemm", &fr_dispatch::gemm_cuda);
  m.impl("attention", &fr_dispatch::attention_cuda);
  m.impl("norm", &fr_dispatch::norm_cuda);
  m.impl("rope", &fr_dispatch::rope_cuda);
  m.impl("swiglu", &fr_dispatch::swiglu_cuda);
}
#endif
