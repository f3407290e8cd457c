// KD loss on the CPU: argument checks, the streaming over rows and vocabulary chunks, and
// threading; the per-chunk arithmetic lives in the per-ISA kernels (kd_kernels.h).
//
// Forward, per row, one pass over the vocabulary in chunks that stay in L1: with P the
// distribution the KL is taken under (teacher; student for reverse) and Q the other, keep
// running maxima mp, mq and, relative to them, Zp = sum exp(xp), Zq = sum exp(xq) and
// A = sum exp(xp) (xp - xq) with x = (logit - m) / T. When a chunk raises a maximum by
// d = (m_old - m_new) / T (<= 0) the sums move to the new frame:
//   Zp <- e^dp Zp,  Zq <- e^dq Zq,  A <- e^dp (A + Zp (dp - dq)).
// At the end KL(P || Q) = A / Zp - log Zp + log Zq, every term of moderate size, so nothing
// cancels catastrophically at any temperature or logit scale.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../half.h"
#include "../parallel.h"
#include "kd_kernels.h"
#include "tensorslim/distill.h"

namespace tensorslim {
namespace {

using cpu::KdKernels;

constexpr int64_t kChunk = 2048;  // vocabulary chunk: 8 KiB of fp32 per operand

// Logits [r, c0 : c0 + n) as fp32: the row itself for f32, else converted into buf.
// float64 logits (the reference path) are read as they are.
const double* load_chunk(const TensorView& x, int64_t r, int64_t c0, int64_t, double*) {
  return x.ptr<double>() + r * x.strides[0] + c0;
}

const float* load_chunk(const TensorView& x, int64_t r, int64_t c0, int64_t n, float* buf) {
  const int64_t off = r * x.strides[0] + c0;
  if (x.dtype == DType::kFloat32) return x.ptr<float>() + off;
  const uint16_t* src = x.ptr<uint16_t>() + off;
  if (x.dtype == DType::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) buf[i] = cpu::bf16_to_float(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = cpu::f16_to_float(src[i]);
  }
  return buf;
}

template <class T>
T load_one(const TensorView& x, int64_t r, int64_t c) {
  T v;
  return *load_chunk(x, r, c, 1, &v);
}

void store_chunk(const float* g, const TensorView& out, int64_t r, int64_t c0, int64_t n) {
  uint16_t* dst = out.ptr<uint16_t>() + r * out.strides[0] + c0;
  const bool bf16 = out.dtype == DType::kBFloat16;
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16 ? cpu::float_to_bf16(g[i]) : cpu::float_to_f16(g[i]);
}

[[noreturn]] void throw_nonfinite(const char* what, int64_t row) {
  throw ValueError(std::string("kd_loss: ") + what + " contains NaN or Inf (row " +
                   std::to_string(row) + "); logits must be finite");
}

void check_logits(const TensorView& x, const char* what) {
  TS_CHECK_TYPE(x.device == DeviceType::kCPU, std::string("kd_loss: ") + what + " must be on the CPU");
  TS_CHECK_VALUE(x.ndim == 2, std::string("kd_loss: ") + what + ": expected a 2-D [rows, vocab] view, got " +
                                  shape_str(x));
  TS_CHECK_TYPE(x.dtype == DType::kFloat32 || x.dtype == DType::kBFloat16 || x.dtype == DType::kFloat16 ||
                    x.dtype == DType::kFloat64,
                std::string("kd_loss: ") + what + ": expected float32, bfloat16, float16 or float64, got " +
                    dtype_name(x.dtype));
  TS_CHECK_VALUE(x.shape[1] <= 1 || x.strides[1] == 1,
                 std::string("kd_loss: ") + what + ": the vocabulary dimension must have stride 1");
}

void check_vec(const TensorView& x, DType dt, int64_t n, const char* what) {
  TS_CHECK_TYPE(x.device == DeviceType::kCPU, std::string("kd_loss: ") + what + " must be on the CPU");
  check_dtype(x, dt, what);
  TS_CHECK_VALUE(x.ndim == 1 && x.shape[0] == n, std::string("kd_loss: ") + what + ": expected shape [" +
                                                     std::to_string(n) + "], got " + shape_str(x));
  check_contiguous(x, what);
}

struct Args {
  int64_t rows, vocab, k;
  double inv_t;   // each path rounds it to its float type once (kernels and frame shifts agree)
  bool f64;       // float64 logits: the scalar reference in double
  bool ce;  // the CE term is computed (labels given, alpha < 1)
  double kd_weight, ce_weight;
};

Args check_args(const TensorView& s, const TensorView& t, const TensorView* labels,
                const TensorView* topk, const KdOptions& opt) {
  check_logits(s, "student_logits");
  check_logits(t, "teacher_logits");
  TS_CHECK_VALUE(s.shape[1] == t.shape[1],
                 "kd_loss: vocabulary mismatch: student_logits has " + std::to_string(s.shape[1]) +
                     " classes, teacher_logits has " + std::to_string(t.shape[1]));
  TS_CHECK_VALUE(s.shape[0] == t.shape[0], "kd_loss: teacher_logits: expected " + std::to_string(s.shape[0]) +
                                               " rows like student_logits, got " + shape_str(t));
  TS_CHECK_VALUE(std::isfinite(opt.temperature) && opt.temperature > 0,
                 "kd_loss: temperature must be a finite number > 0, got " + std::to_string(opt.temperature));
  TS_CHECK_VALUE(opt.alpha >= 0 && opt.alpha <= 1,
                 "kd_loss: alpha must be in [0, 1], got " + std::to_string(opt.alpha));
  TS_CHECK_TYPE((s.dtype == DType::kFloat64) == (t.dtype == DType::kFloat64),
                std::string("kd_loss: float64 needs both logits in float64, got student_logits ") +
                    dtype_name(s.dtype) + " and teacher_logits " + dtype_name(t.dtype));
  Args a{s.shape[0], s.shape[1], 0, 1.0 / opt.temperature, s.dtype == DType::kFloat64, false, 1.0f, 0.0f};
  TS_CHECK_VALUE(a.vocab > 0 || a.rows == 0, "kd_loss: student_logits: the vocabulary is empty");
  if (opt.has_labels) {
    TS_CHECK_VALUE(labels != nullptr, "kd_loss: labels missing");
    check_vec(*labels, DType::kInt32, a.rows, "labels");
    a.ce = opt.alpha < 1;
    a.kd_weight = opt.alpha;
    a.ce_weight = 1 - opt.alpha;
  }
  if (topk) {
    TS_CHECK_VALUE(!opt.reverse, "kd_loss: top_k needs the forward KL (reverse=False): the reverse KL "
                                 "weighs every token by the student and is unbounded off the teacher's top k");
    TS_CHECK_TYPE(topk->dtype == DType::kInt32 && topk->ndim == 2 && topk->shape[0] == a.rows,
                  "kd_loss: top_k indices: expected int32 [" + std::to_string(a.rows) + ", k], got " +
                      shape_str(*topk));
    check_contiguous(*topk, "top_k indices");
    a.k = topk->shape[1];
    TS_CHECK_VALUE(a.k >= 1 && a.k <= a.vocab, "kd_loss: top_k must be in [1, vocab], got " + std::to_string(a.k));
  }
  return a;
}

// The row's label, checked; -1 when the row is ignored.
int64_t row_label(const TensorView* labels, const KdOptions& opt, int64_t vocab, int64_t r) {
  if (!opt.has_labels) return 0;
  const int64_t y = labels->ptr<int32_t>()[r];
  if (y == opt.ignore_index) return -1;
  if (y < 0 || y >= vocab)
    throw ValueError("kd_loss: labels: value " + std::to_string(y) + " at row " + std::to_string(r) +
                     " is out of range [0, " + std::to_string(vocab) + ") and is not ignore_index (" +
                     std::to_string(opt.ignore_index) + ")");
  return y;
}

template <class T>
void forward_full_row(const cpu::KdKernelsT<T>& K, const TensorView& s, const TensorView& t, const Args& a,
                      const KdOptions& opt, int64_t r, T* bs, T* bt, T* st) {
  const T ninf = -std::numeric_limits<T>::infinity(), inv_t = static_cast<T>(a.inv_t);
  T mp = ninf, mq = ninf;
  double zp = 0, zq = 0, acc = 0, z1 = 0;
  const bool t1 = inv_t == 1;
  for (int64_t c0 = 0; c0 < a.vocab; c0 += kChunk) {
    const int64_t n = std::min(kChunk, a.vocab - c0);
    const T* sc = load_chunk(s, r, c0, n, bs);
    const T* tc = load_chunk(t, r, c0, n, bt);
    bool bad_s = false, bad_t = false;
    const T cms = K.max_checked(sc, n, &bad_s);
    if (bad_s) throw_nonfinite("student_logits", r);
    const T cmt = K.max_checked(tc, n, &bad_t);
    if (bad_t) throw_nonfinite("teacher_logits", r);
    const T* pc = opt.reverse ? sc : tc;
    const T* qc = opt.reverse ? tc : sc;
    const T nmp = std::fmax(mp, opt.reverse ? cms : cmt);
    const T nmq = std::fmax(mq, opt.reverse ? cmt : cms);
    if (c0 > 0) {
      const double dp = (static_cast<double>(mp) - nmp) * inv_t, dq = (static_cast<double>(mq) - nmq) * inv_t;
      const double ep = std::exp(dp);
      acc = ep * (acc + zp * (dp - dq));
      zp *= ep;
      zq *= std::exp(dq);
      if (a.ce && !t1) z1 *= std::exp(static_cast<double>(opt.reverse ? mp : mq) - (opt.reverse ? nmp : nmq));
    }
    mp = nmp;
    mq = nmq;
    double sums[3] = {0, 0, 0};
    K.kl_sums(pc, qc, n, mp, mq, inv_t, sums);
    zp += sums[0];
    zq += sums[1];
    acc += sums[2];
    if (a.ce && !t1) z1 += K.sum_exp(sc, n, opt.reverse ? mp : mq, T(1));
  }
  const double kl = acc / zp - std::log(zp) + std::log(zq);
  const T ms = opt.reverse ? mp : mq, mt = opt.reverse ? mq : mp;
  const double zs = opt.reverse ? zp : zq, zt = opt.reverse ? zq : zp;
  st[kStudentMax] = ms;
  st[kStudentLogZ] = static_cast<T>(std::log(zs));
  st[kTeacherMax] = mt;
  st[kTeacherLogZ] = static_cast<T>(std::log(zt));
  st[kStudentLogZ1] = a.ce ? static_cast<T>(std::log(t1 ? zs : z1)) : T(0);
  st[kKl] = static_cast<T>(kl);
}

template <class T>
void forward_topk_row(const cpu::KdKernelsT<T>& K, const TensorView& s, const TensorView& t, const TensorView& topk,
                      const Args& a, int64_t r, T* bs, T* st) {
  // The student's full partition functions (at T and, for CE, at 1), streamed.
  const T inv_t = static_cast<T>(a.inv_t);
  T ms = -std::numeric_limits<T>::infinity();
  double zs = 0, z1 = 0;
  for (int64_t c0 = 0; c0 < a.vocab; c0 += kChunk) {
    const int64_t n = std::min(kChunk, a.vocab - c0);
    const T* sc = load_chunk(s, r, c0, n, bs);
    bool bad = false;
    const T nms = std::fmax(ms, K.max_checked(sc, n, &bad));
    if (bad) throw_nonfinite("student_logits", r);
    if (c0 > 0) {
      zs *= std::exp((static_cast<double>(ms) - nms) * inv_t);
      if (a.ce) z1 *= std::exp(static_cast<double>(ms) - nms);
    }
    ms = nms;
    zs += K.sum_exp(sc, n, ms, inv_t);
    if (a.ce) z1 += K.sum_exp(sc, n, ms, T(1));
  }
  // The teacher over its k tokens only, in double (k is small).
  const int32_t* idx = topk.ptr<int32_t>() + r * a.k;
  T mt = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < a.k; ++j) {
    if (idx[j] < 0 || idx[j] >= a.vocab)
      throw ValueError("kd_loss: top_k indices: " + std::to_string(idx[j]) + " at row " + std::to_string(r) +
                       " is out of range [0, " + std::to_string(a.vocab) + ")");
    const T v = load_one<T>(t, r, idx[j]);
    if (!std::isfinite(v)) throw_nonfinite("teacher_logits", r);
    mt = std::fmax(mt, v);
  }
  double zt = 0, acc = 0;
  for (int64_t j = 0; j < a.k; ++j) {
    const double xt = (static_cast<double>(load_one<T>(t, r, idx[j])) - mt) * inv_t;
    const double xs = (static_cast<double>(load_one<T>(s, r, idx[j])) - ms) * inv_t;
    const double w = std::exp(xt);
    zt += w;
    if (w > 0) acc += w * (xt - xs);
  }
  st[kStudentMax] = ms;
  st[kStudentLogZ] = static_cast<T>(std::log(zs));
  st[kTeacherMax] = mt;
  st[kTeacherLogZ] = static_cast<T>(std::log(zt));
  st[kStudentLogZ1] = a.ce ? static_cast<T>(std::log(z1)) : T(0);
  st[kKl] = static_cast<T>(acc / zt - std::log(zt) + std::log(zs));
}

int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(vocab, 1)); }

template <class T>
void forward_rows(const cpu::KdKernelsT<T>& K, const TensorView& s, const TensorView& t, const TensorView* labels,
                  const TensorView* topk, const KdOptions& opt, const Args& a, const TensorView& row_loss,
                  const TensorView& stats) {
  const double t2 = opt.temperature * opt.temperature;
  cpu::parallel_for(a.rows, row_grain(a.vocab), [&](int64_t begin, int64_t end) {
    std::vector<T> bs(kChunk), bt(kChunk);
    for (int64_t r = begin; r < end; ++r) {
      T* st = stats.ptr<T>() + r * kKdStats;
      std::fill(st, st + kKdStats, T(0));
      const int64_t y = row_label(labels, opt, a.vocab, r);
      if (y < 0) {
        row_loss.ptr<T>()[r] = 0;
        continue;
      }
      if (topk) forward_topk_row(K, s, t, *topk, a, r, bs.data(), st);
      else forward_full_row(K, s, t, a, opt, r, bs.data(), bt.data(), st);
      double loss = a.kd_weight * t2 * st[kKl];
      if (a.ce) loss += a.ce_weight * (static_cast<double>(st[kStudentLogZ1]) - (load_one<T>(s, r, y) - st[kStudentMax]));
      row_loss.ptr<T>()[r] = static_cast<T>(loss);
    }
  });
}

template <class T>
void backward_rows(const cpu::KdKernelsT<T>& K, const TensorView& s, const TensorView& t, const TensorView* labels,
                   const TensorView* topk, const TensorView& stats, const TensorView& row_scale, const KdOptions& opt,
                   const Args& a, const TensorView& grad) {
  const T inv_t = static_cast<T>(a.inv_t);
  cpu::parallel_for(a.rows, row_grain(a.vocab), [&](int64_t begin, int64_t end) {
    std::vector<T> bs(kChunk), bt(kChunk), bg(kChunk);
    for (int64_t r = begin; r < end; ++r) {
      const T w = row_scale.ptr<T>()[r];
      const int64_t y = row_label(labels, opt, a.vocab, r);
      const T* st = stats.ptr<T>() + r * kKdStats;
      cpu::KdGradParamsT<T> p{st[kStudentMax], st[kTeacherMax], inv_t, st[kStudentLogZ], st[kTeacherLogZ],
                              st[kStudentLogZ1], static_cast<T>(w * a.kd_weight * opt.temperature),
                              a.ce ? static_cast<T>(w * a.ce_weight) : T(0), st[kKl], opt.reverse, topk == nullptr};
      const bool zero_row = y < 0 || w == 0;
      const bool direct = grad.dtype == DType::kFloat32 || grad.dtype == DType::kFloat64;
      for (int64_t c0 = 0; c0 < a.vocab; c0 += kChunk) {
        const int64_t n = std::min(kChunk, a.vocab - c0);
        T* g = direct ? grad.ptr<T>() + r * grad.strides[0] + c0 : bg.data();
        if (zero_row) {
          std::fill(g, g + n, T(0));
        } else {
          const T* sc = load_chunk(s, r, c0, n, bs.data());
          const T* tc = topk ? sc : load_chunk(t, r, c0, n, bt.data());  // top_k: teacher not read here
          K.grad(sc, tc, n, p, g);
          if (a.ce && y >= c0 && y < c0 + n) g[y - c0] -= p.ce_coef;
          if (topk) {  // - kd_coef * p_t at the teacher's k tokens that fall in this chunk
            const int32_t* idx = topk->ptr<int32_t>() + r * a.k;
            for (int64_t j = 0; j < a.k; ++j) {
              if (idx[j] < c0 || idx[j] >= c0 + n) continue;
              const T lt = (load_one<T>(t, r, idx[j]) - p.mt) * inv_t - p.log_zt;
              g[idx[j] - c0] -= p.kd_coef * std::exp(lt);
            }
          }
        }
        if constexpr (std::is_same<T, float>::value) {
          if (!direct) store_chunk(g, grad, r, c0, n);
        }
      }
    }
  });
}

// The per-row outputs: float64 for float64 logits, else fp32.
DType acc_dtype(const Args& a) { return a.f64 ? DType::kFloat64 : DType::kFloat32; }

void check_stats(const TensorView& stats, const Args& a) {
  check_shape2(stats, a.rows, kKdStats, "stats");
  check_dtype(stats, acc_dtype(a), "stats");
  check_contiguous(stats, "stats");
}

}  // namespace

void kd_loss_forward(const TensorView& s, const TensorView& t, const TensorView* labels, const TensorView* topk,
                     const KdOptions& opt, const TensorView& row_loss, const TensorView& stats) {
  const Args a = check_args(s, t, labels, topk, opt);
  check_vec(row_loss, acc_dtype(a), a.rows, "row_loss");
  check_stats(stats, a);
  if (a.f64) forward_rows<double>(cpu::scalar_kd_kernels_f64(), s, t, labels, topk, opt, a, row_loss, stats);
  else forward_rows<float>(cpu::kd_kernels_for(cpu::active_isa()), s, t, labels, topk, opt, a, row_loss, stats);
}

void kd_loss_backward(const TensorView& s, const TensorView& t, const TensorView* labels, const TensorView* topk,
                      const TensorView& stats, const TensorView& row_scale, const KdOptions& opt,
                      const TensorView& grad) {
  const Args a = check_args(s, t, labels, topk, opt);
  check_stats(stats, a);
  check_vec(row_scale, acc_dtype(a), a.rows, "row_scale");
  check_logits(grad, "grad");
  check_dtype(grad, s.dtype, "grad");
  check_shape2(grad, a.rows, a.vocab, "grad");
  if (a.f64) backward_rows<double>(cpu::scalar_kd_kernels_f64(), s, t, labels, topk, stats, row_scale, opt, a, grad);
  else backward_rows<float>(cpu::kd_kernels_for(cpu::active_isa()), s, t, labels, topk, stats, row_scale, opt, a, grad);
}

}  // namespace tensorslim
