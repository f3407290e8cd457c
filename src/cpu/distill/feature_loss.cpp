// Feature-level distillation losses on the CPU (tensorslim/distill_features.h): argument
// checks, rows, threading and the float64 path; the per-chunk arithmetic is in the per-ISA
// kernels (feature_kernels.h). A row is read once as contiguous values (converted to fp32 for
// bf16 / f16), then its kernels run over chunks of kChunk values so lane sums stay short.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "../float_rows.h"
#include "../parallel.h"
#include "feature_kernels.h"
#include "tensorslim/distill_features.h"

namespace tensorslim {
namespace {

using cpu::AttnRow;
using cpu::FeatureKernels;

constexpr int64_t kChunk = 2048;

struct Names {
  const char* fn;  // the Python function, first word of every message
  const char* s;   // the student tensor's name
  const char* t;   // the teacher tensor's name
};

const Names kHidden{"hidden_loss", "student_hidden", "teacher_hidden"};
const Names kAttention{"attention_loss", "student_attn", "teacher_attn"};

std::string msg(const Names& nm, const std::string& what) { return std::string(nm.fn) + ": " + what; }

void check_rows(const TensorView& x, const Names& nm, const char* what) {
  TS_CHECK_TYPE(x.device == DeviceType::kCPU, msg(nm, std::string(what) + " must be on the CPU"));
  TS_CHECK_VALUE(x.ndim == 2, msg(nm, std::string(what) + ": expected a 2-D [rows, width] view, got " + shape_str(x)));
  TS_CHECK_TYPE(cpu::is_float_dtype(x.dtype) || x.dtype == DType::kFloat64,
                msg(nm, std::string(what) + ": expected float32, bfloat16, float16 or float64, got " +
                            dtype_name(x.dtype)));
  TS_CHECK_VALUE(x.shape[1] <= 1 || x.strides[1] == 1,
                 msg(nm, std::string(what) + ": the last dimension must have stride 1"));
}

void check_f64(const TensorView& x, int64_t rows, int64_t cols, const Names& nm, const char* what) {
  TS_CHECK_TYPE(x.device == DeviceType::kCPU, msg(nm, std::string(what) + " must be on the CPU"));
  check_dtype(x, DType::kFloat64, what);
  if (cols < 0) {
    TS_CHECK_VALUE(x.ndim == 1 && x.shape[0] == rows, msg(nm, std::string(what) + ": expected shape [" +
                                                                  std::to_string(rows) + "], got " + shape_str(x)));
  } else {
    check_shape2(x, rows, cols, what);
  }
  check_contiguous(x, what);
}

// Checks a student / teacher pair; true when both are float64 (the double path).
bool check_pair(const TensorView& s, const TensorView& t, const Names& nm) {
  check_rows(s, nm, nm.s);
  check_rows(t, nm, nm.t);
  TS_CHECK_VALUE(s.shape[0] == t.shape[0] && s.shape[1] == t.shape[1],
                 msg(nm, std::string(nm.t) + ": expected shape " + shape_str(s) + " like " + nm.s + ", got " +
                             shape_str(t)));
  TS_CHECK_VALUE(s.shape[1] > 0 || s.shape[0] == 0, msg(nm, std::string(nm.s) + ": rows are empty"));
  const bool d = s.dtype == DType::kFloat64;
  TS_CHECK_TYPE(d == (t.dtype == DType::kFloat64),
                msg(nm, std::string("float64 needs both tensors in float64, got ") + nm.s + " " +
                            dtype_name(s.dtype) + " and " + nm.t + " " + dtype_name(t.dtype)));
  return d;
}

void check_grad(const TensorView& g, const TensorView& s, const Names& nm) {
  TS_CHECK_TYPE(g.device == DeviceType::kCPU, msg(nm, "grad must be on the CPU"));
  check_dtype(g, s.dtype, "grad");
  check_shape2(g, s.shape[0], s.shape[1], "grad");
  TS_CHECK_VALUE(g.shape[1] <= 1 || g.strides[1] == 1, msg(nm, "grad: the last dimension must have stride 1"));
}

// Row r as contiguous T: fp32 rows through row_as_f32 (converted when bf16 / f16), f64 as is.
const float* row_of(const TensorView& x, int64_t r, std::vector<float>& buf) { return cpu::row_as_f32(x, r, buf); }
const double* row_of(const TensorView& x, int64_t r, std::vector<double>&) {
  return x.ptr<double>() + r * x.strides[0];
}

// Where the gradient of row r is written: the row itself when it has the compute type.
float* grad_row(const TensorView& g, int64_t r, std::vector<float>& buf) {
  if (g.dtype == DType::kFloat32) return g.ptr<float>() + r * g.strides[0];
  buf.resize(g.shape[1]);
  return buf.data();
}
double* grad_row(const TensorView& g, int64_t r, std::vector<double>&) { return g.ptr<double>() + r * g.strides[0]; }
void finish_grad(const float* src, const TensorView& g, int64_t r) {
  if (g.dtype != DType::kFloat32) cpu::store_row(src, g, r);
}
void finish_grad(const double*, const TensorView&, int64_t) {}

template <class T>
const FeatureKernels<T>& kernels();
template <>
const FeatureKernels<float>& kernels<float>() { return cpu::feature_kernels_for(cpu::active_isa()); }
template <>
const FeatureKernels<double>& kernels<double>() { return cpu::scalar_feature_kernels<double>(); }

template <class T>
bool all_finite(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

// A row's sums came out NaN / Inf: name the tensor holding one, else the values overflowed.
template <class T>
[[noreturn]] void fail_row(const Names& nm, const T* s, const T* t, int64_t n, int64_t r) {
  const std::string row = " (row " + std::to_string(r) + ")";
  if (!all_finite(s, n)) throw ValueError(msg(nm, std::string(nm.s) + " contains NaN or Inf" + row));
  if (!all_finite(t, n)) throw ValueError(msg(nm, std::string(nm.t) + " contains NaN or Inf" + row));
  throw ValueError(msg(nm, "the squared values overflow" + row + "; the inputs are too large"));
}

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

template <class T>
void hidden_forward(const TensorView& S, const TensorView& Tt, HiddenKind kind, double eps, const TensorView& row_loss,
                    const TensorView& stats) {
  const FeatureKernels<T>& K = kernels<T>();
  const int64_t R = S.shape[0], D = S.shape[1];
  cpu::parallel_for(R, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<T> bs, bt;
    for (int64_t r = begin; r < end; ++r) {
      const T* s = row_of(S, r, bs);
      const T* t = row_of(Tt, r, bt);
      double* st = stats.ptr<double>() + r * kHiddenStats;
      double d[3] = {0, 0, 0};
      for (int64_t c0 = 0; c0 < D; c0 += kChunk) {
        const int64_t n = std::min(kChunk, D - c0);
        if (kind == HiddenKind::kMse) d[0] += K.sq_diff(s + c0, t + c0, n);
        else K.dots(s + c0, t + c0, n, d);
      }
      if (!std::isfinite(d[0]) || !std::isfinite(d[1]) || !std::isfinite(d[2])) fail_row(kHidden, s, t, D, r);
      std::copy(d, d + 3, st);
      double loss = d[0];
      if (kind == HiddenKind::kCosine) {
        const double ns = std::max(std::sqrt(d[0]), eps), nt = std::max(std::sqrt(d[1]), eps);
        loss = 1.0 - d[2] / (ns * nt);
      }
      row_loss.ptr<double>()[r] = loss;
    }
  });
}

template <class T>
void hidden_backward(const TensorView& S, const TensorView& Tt, HiddenKind kind, double eps, const TensorView& stats,
                     const TensorView& row_scale, const TensorView& G) {
  const FeatureKernels<T>& K = kernels<T>();
  const int64_t R = S.shape[0], D = S.shape[1];
  cpu::parallel_for(R, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<T> bs, bt, bg;
    for (int64_t r = begin; r < end; ++r) {
      const double w = row_scale.ptr<double>()[r];
      const double* st = stats.ptr<double>() + r * kHiddenStats;
      double a = 2 * w, b = -2 * w;  // mse: 2 w (s - t)
      if (kind == HiddenKind::kCosine) {  // d(1 - cos)/ds = A s + B t
        const double ns = std::max(std::sqrt(st[0]), eps), nt = std::max(std::sqrt(st[1]), eps);
        a = std::sqrt(st[0]) > eps ? w * st[2] / (ns * ns * ns * nt) : 0.0;
        b = -w / (ns * nt);
      }
      T* g = grad_row(G, r, bg);
      K.axpby(row_of(S, r, bs), row_of(Tt, r, bt), D, static_cast<T>(a), static_cast<T>(b), g);
      finish_grad(g, G, r);
    }
  });
}

// The row's maxima and log partition functions (sides given as scores), checked finite.
template <class T>
AttnRow<T> attention_row(const FeatureKernels<T>& K, const T* s, const T* t, int64_t n, bool sl, bool tl, int64_t r) {
  bool bad_s = false, bad_t = false;
  T ms = -std::numeric_limits<T>::infinity(), mt = ms;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t k = std::min(kChunk, n - c0);
    ms = std::fmax(ms, K.max_checked(s + c0, k, &bad_s));
    mt = std::fmax(mt, K.max_checked(t + c0, k, &bad_t));
  }
  const std::string row = " (row " + std::to_string(r) + ")";
  if (bad_s) throw ValueError(msg(kAttention, std::string(kAttention.s) + " contains NaN or Inf" + row));
  if (bad_t) throw ValueError(msg(kAttention, std::string(kAttention.t) + " contains NaN or Inf" + row));
  double zs = 0, zt = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t k = std::min(kChunk, n - c0);
    if (sl) zs += K.sum_exp(s + c0, k, ms);
    if (tl) zt += K.sum_exp(t + c0, k, mt);
  }
  return AttnRow<T>{sl, tl, ms, sl ? static_cast<T>(std::log(zs)) : T(0), mt, tl ? static_cast<T>(std::log(zt)) : T(0),
                    T(0), T(0)};
}

template <class T>
void attention_forward(const TensorView& S, const TensorView& Tt, AttentionKind kind, bool sl, bool tl,
                       const TensorView& row_loss, const TensorView& stats) {
  const FeatureKernels<T>& K = kernels<T>();
  const int64_t R = S.shape[0], L = S.shape[1];
  cpu::parallel_for(R, row_grain(L), [&](int64_t begin, int64_t end) {
    std::vector<T> bs, bt;
    for (int64_t r = begin; r < end; ++r) {
      const T* s = row_of(S, r, bs);
      const T* t = row_of(Tt, r, bt);
      const AttnRow<T> p = attention_row(K, s, t, L, sl, tl, r);
      double out[2] = {0, 0};
      for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
        const int64_t n = std::min(kChunk, L - c0);
        if (kind == AttentionKind::kKl) K.attn_kl_sums(s + c0, t + c0, n, p, out);
        else K.attn_mse_sums(s + c0, t + c0, n, p, out);
      }
      if (!std::isfinite(out[0]) || !std::isfinite(out[1])) fail_row(kAttention, s, t, L, r);
      double* st = stats.ptr<double>() + r * kAttentionStats;
      st[0] = p.ms;
      st[1] = p.lzs;
      st[2] = p.mt;
      st[3] = p.lzt;
      st[4] = out[1];
      row_loss.ptr<double>()[r] = out[0];
    }
  });
}

template <class T>
void attention_backward(const TensorView& S, const TensorView& Tt, AttentionKind kind, bool sl, bool tl,
                        const TensorView& stats, const TensorView& row_scale, const TensorView& G) {
  const FeatureKernels<T>& K = kernels<T>();
  const int64_t R = S.shape[0], L = S.shape[1];
  cpu::parallel_for(R, row_grain(L), [&](int64_t begin, int64_t end) {
    std::vector<T> bs, bt, bg;
    for (int64_t r = begin; r < end; ++r) {
      const double* st = stats.ptr<double>() + r * kAttentionStats;
      const AttnRow<T> p{sl, tl, static_cast<T>(st[0]), static_cast<T>(st[1]), static_cast<T>(st[2]),
                         static_cast<T>(st[3]), static_cast<T>(row_scale.ptr<double>()[r]), static_cast<T>(st[4])};
      const T* s = row_of(S, r, bs);
      const T* t = row_of(Tt, r, bt);
      T* g = grad_row(G, r, bg);
      for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
        const int64_t n = std::min(kChunk, L - c0);
        if (kind == AttentionKind::kKl) K.attn_kl_grad(s + c0, t + c0, n, p, g + c0);
        else K.attn_mse_grad(s + c0, t + c0, n, p, g + c0);
      }
      finish_grad(g, G, r);
    }
  });
}

void check_hidden_kind(HiddenKind kind, double eps) {
  TS_CHECK_VALUE(kind == HiddenKind::kMse || kind == HiddenKind::kCosine, "hidden_loss: unknown kind");
  TS_CHECK_VALUE(std::isfinite(eps) && eps > 0, "hidden_loss: eps must be a finite number > 0, got " + std::to_string(eps));
}

void check_attention_kind(AttentionKind kind) {
  TS_CHECK_VALUE(kind == AttentionKind::kKl || kind == AttentionKind::kMse, "attention_loss: unknown kind");
}

}  // namespace

void hidden_loss_forward(const TensorView& s, const TensorView& t, HiddenKind kind, double eps,
                         const TensorView& row_loss, const TensorView& stats) {
  const bool f64 = check_pair(s, t, kHidden);
  check_hidden_kind(kind, eps);
  check_f64(row_loss, s.shape[0], -1, kHidden, "row_loss");
  check_f64(stats, s.shape[0], kHiddenStats, kHidden, "stats");
  f64 ? hidden_forward<double>(s, t, kind, eps, row_loss, stats) : hidden_forward<float>(s, t, kind, eps, row_loss, stats);
}

void hidden_loss_backward(const TensorView& s, const TensorView& t, HiddenKind kind, double eps,
                          const TensorView& stats, const TensorView& row_scale, const TensorView& grad) {
  const bool f64 = check_pair(s, t, kHidden);
  check_hidden_kind(kind, eps);
  check_f64(stats, s.shape[0], kHiddenStats, kHidden, "stats");
  check_f64(row_scale, s.shape[0], -1, kHidden, "row_scale");
  check_grad(grad, s, kHidden);
  f64 ? hidden_backward<double>(s, t, kind, eps, stats, row_scale, grad)
      : hidden_backward<float>(s, t, kind, eps, stats, row_scale, grad);
}

void attention_loss_forward(const TensorView& s, const TensorView& t, AttentionKind kind, bool student_logits,
                            bool teacher_logits, const TensorView& row_loss, const TensorView& stats) {
  const bool f64 = check_pair(s, t, kAttention);
  check_attention_kind(kind);
  check_f64(row_loss, s.shape[0], -1, kAttention, "row_loss");
  check_f64(stats, s.shape[0], kAttentionStats, kAttention, "stats");
  f64 ? attention_forward<double>(s, t, kind, student_logits, teacher_logits, row_loss, stats)
      : attention_forward<float>(s, t, kind, student_logits, teacher_logits, row_loss, stats);
}

void attention_loss_backward(const TensorView& s, const TensorView& t, AttentionKind kind, bool student_logits,
                             bool teacher_logits, const TensorView& stats, const TensorView& row_scale,
                             const TensorView& grad) {
  const bool f64 = check_pair(s, t, kAttention);
  check_attention_kind(kind);
  check_f64(stats, s.shape[0], kAttentionStats, kAttention, "stats");
  check_f64(row_scale, s.shape[0], -1, kAttention, "row_scale");
  check_grad(grad, s, kAttention);
  f64 ? attention_backward<double>(s, t, kind, student_logits, teacher_logits, stats, row_scale, grad)
      : attention_backward<float>(s, t, kind, student_logits, teacher_logits, stats, row_scale, grad);
}

}  // namespace tensorslim
