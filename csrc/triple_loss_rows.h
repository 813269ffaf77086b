// Row kernels of the triple loss, written once with GCC vector extensions and compiled once per instruction set:
// each triple_loss_rows_<isa>.cpp includes this file inside its own namespace under `#pragma GCC target`, so the same
// code becomes AVX-512 (16 lanes), AVX2 (8 lanes) or SSE2 (4 lanes) instructions. No include guard on purpose:
// each inclusion, in its own namespace, is a separate copy.
//
// One student/teacher row pair is handled in three sweeps; the row (2 x 122 KB in fp32) stays in L2 after the
// first, so DRAM sees each logit once and each gradient element once:
//   A. the maxima of s and t (no exp), and sum (s - t)^2 of the MSE term, free in a sweep that waits for DRAM;
//   B. es = exp((s - max_s)/T) and et = exp((t - max_t)/T) into fp32 scratch, and their sums; exp(s - max_s)
//      for the MLM normalizer is es^T when T is a small integer (the default T = 2), so there are two exps per
//      element in all;
//   C. q = es/Zs, p = et/Zt, softmax(s) from es, the gradient written in the student's dtype, and
//      KL = sum p*(log p - log q) accumulated from the centred logits so large logits do not cancel. With
//      alpha_mse > 0, s and t are read again (from L2) for the MSE gradient's 2 * (s - t) term.

// The includer defines FASTDISTIL_VECTOR_BYTES to the ISA's native register width (64, 32 or 16): GCC lowers
// vector comparisons wider than the hardware to scalar code, so the vectors must match the registers.
typedef float vf __attribute__((vector_size(FASTDISTIL_VECTOR_BYTES)));
typedef int32_t vi __attribute__((vector_size(FASTDISTIL_VECTOR_BYTES)));
typedef uint32_t vu __attribute__((vector_size(FASTDISTIL_VECTOR_BYTES)));
typedef uint16_t vh __attribute__((vector_size(FASTDISTIL_VECTOR_BYTES / 2)));
static constexpr int64_t kLanes = FASTDISTIL_VECTOR_BYTES / 4;

// An out-of-line call would pass vectors through memory, so every helper is forced inline.
#ifndef FASTDISTIL_INLINE
#define FASTDISTIL_INLINE static inline __attribute__((always_inline))
#endif

FASTDISTIL_INLINE vf splat(float x) { return vf{} + x; }

FASTDISTIL_INLINE vf select(vi mask, vf a, vf b) { return mask ? a : b; }

FASTDISTIL_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }

FASTDISTIL_INLINE double hsum(vf v) {
  double acc = 0.0;
  for (int i = 0; i < kLanes; ++i) acc += v[i];
  return acc;
}

FASTDISTIL_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

static constexpr float kLog2e = 1.44269504088896341f;

// 2^y for y <= 127, within 2 ulp; exactly 0 below -127 (and for -inf), where float exp underflows too: the
// clamp makes the exponent field 0. Base 2 lets the callers fold log2(e) and 1/T into the one FMA that
// centres the logits.
FASTDISTIL_INLINE vf vexp2(vf y) {
  y = vmax(y, splat(-127.0f));
  const vf round_magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  vf shifted = y + round_magic;
  vi n = (vi)shifted - (vi)round_magic;
  vf f = y - (shifted - round_magic);  // in [-0.5, 0.5]
  // 2^f = e^(f ln2): Taylor to degree 6, relative error below 1.3e-7 on [-0.5, 0.5]
  vf p = splat(1.5403530393381609e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  return p * (vf)((n + 127) << 23);
}

// Loads and stores of one vector, converting to and from fp32. Half and bfloat16 use the same rounding as c10
// (round to nearest even), so the vector body and the scalar tail agree bit for bit.
FASTDISTIL_INLINE vf vload(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

FASTDISTIL_INLINE vf vload(const c10::BFloat16* p) {
  vh h;
  __builtin_memcpy(&h, p, sizeof(h));
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

FASTDISTIL_INLINE vf vload(const c10::Half* p) {
  vh hh;
  __builtin_memcpy(&hh, p, sizeof(hh));
  vu h = __builtin_convertvector(hh, vu);
  const uint32_t exp_mask = 0x7c00u << 13;
  vu o = (h & 0x7fffu) << 13;
  vu e = o & exp_mask;
  o += (127u - 15u) << 23;
  vi inf_or_nan = (vi)(e == exp_mask);
  vi zero_or_sub = (vi)(e == 0u);
  o += (vu)(inf_or_nan & static_cast<int32_t>((128u - 16u) << 23));
  vf renorm = (vf)(o + (1u << 23)) - splat(6.103515625e-05f);  // 2^-14 renormalizes subnormals
  vf out = select(zero_or_sub, renorm, (vf)o);
  return (vf)((vu)out | ((h & 0x8000u) << 16));
}

FASTDISTIL_INLINE void vstore(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(v)); }

FASTDISTIL_INLINE void vstore(c10::BFloat16* p, vf v) {
  vu u = (vu)v;
  vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  vi is_nan = (vi)((u & 0x7fffffffu) > 0x7f800000u);
  rounded = (vu)(((vi)rounded & ~is_nan) | (is_nan & 0x7fc0));
  vh h = __builtin_convertvector(rounded, vh);
  __builtin_memcpy(p, &h, sizeof(h));
}

FASTDISTIL_INLINE void vstore(c10::Half* p, vf v) {
  vu f = (vu)v;
  vu sign = f & 0x80000000u;
  f ^= sign;
  const uint32_t f16_max = (127u + 16u) << 23;
  const uint32_t denorm_magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  vu inf_nan = (vu)select((vi)(f > 0x7f800000u), (vf)(vu{} + 0x7e00u), (vf)(vu{} + 0x7c00u));
  vu sub = (vu)((vf)f + splat(0.5f)) - denorm_magic_bits;  // 0.5f has the bits of denorm_magic_bits
  vu normal = (f + (((15u - 127u) << 23) + 0xfffu) + ((f >> 13) & 1u)) >> 13;
  vu o = (vu)select((vi)(f < (113u << 23)), (vf)sub, (vf)normal);
  o = (vu)select((vi)(f >= f16_max), (vf)inf_nan, (vf)o);
  vh h = __builtin_convertvector(o | (sign >> 16), vh);
  __builtin_memcpy(p, &h, sizeof(h));
}

// Partial vectors at the end of a row go through a one-vector buffer padded with `pad`.
template <typename T>
FASTDISTIL_INLINE vf load_tail(const T* p, int64_t n, float pad) {
  float buf[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) buf[i] = i < n ? static_cast<float>(p[i]) : pad;
  return vload(buf);
}

template <typename T>
FASTDISTIL_INLINE void store_tail(T* p, int64_t n, vf v) {
  float buf[kLanes];
  vstore(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
}

FASTDISTIL_INLINE vi lanes_below(int64_t n) {
  vi idx;
  for (int i = 0; i < kLanes; ++i) idx[i] = i;
  return idx < static_cast<int32_t>(n);
}

// exp(s - max_s) from es = exp((s - max_s)/T): es^T for the integer temperatures 1 and 2 (no exp), otherwise
// an exp of its own.
template <int TPow>
FASTDISTIL_INLINE vf softmax1_numerator(vf es, vf s_centred) {
  if constexpr (TPow == 1) return es;
  if constexpr (TPow == 2) return es * es;
  return vexp2(s_centred * kLog2e);
}

struct RowResult {
  double kl = 0.0;   // KL(p_t || q_s) of this row, at temperature T, not yet scaled by T^2
  double ce = 0.0;   // -log softmax(s)[label]
  double mse = 0.0;  // sum (s - t)^2 over the row, of the raw logits
};

// One logit row. `kl_coef` = alpha_ce * T / n_selected, `ce_coef` = alpha_mlm / n_labelled and `mse_coef` =
// alpha_mse * 2 / n_selected are the weights of the gradient terms (zero when the row is not selected / not
// labelled). MseGrad compiles the MSE gradient in: without it, alpha_mse = 0 costs nothing in sweep C.
// scratch holds 2 * V floats. s_next/t_next (the next row of this thread, or null) are prefetched during
// sweep B, which is compute bound, so the next row's sweep A does not wait for DRAM.
template <int TPow, bool MseGrad, typename S, typename T>
static RowResult logits_row(const S* s, const T* t, S* grad, int64_t V, int64_t label, bool selected,
                            bool labelled, float inv_temp, float kl_coef, float ce_coef, float mse_coef,
                            float* scratch, const S* s_next, const T* t_next) {
  const int64_t full = V / kLanes * kLanes;
  const int64_t rest = V - full;
  // Tail lanes past V: the lowest float, not -inf, so that exp gives 0 and t - s gives 0 rather than NaN.
  const float pad = std::numeric_limits<float>::lowest();
  float* es_buf = scratch;
  float* et_buf = scratch + V;

  // A. maxima, and the squared differences (the tail's padded lanes differ by 0)
  vf ms_v = splat(pad), mt_v = splat(pad), sq_v = splat(0.f);
  auto maxima = [&](vf sv, vf tv) __attribute__((always_inline)) {
    ms_v = vmax(ms_v, sv);
    if (selected) {
      mt_v = vmax(mt_v, tv);
      const vf d = sv - tv;
      sq_v += d * d;
    }
  };
  for (int64_t i = 0; i < full; i += kLanes) maxima(vload(s + i), selected ? vload(t + i) : vf{});
  if (rest) maxima(load_tail(s + full, rest, pad), selected ? load_tail(t + full, rest, pad) : vf{});
  const float ms = hmax(ms_v), mt = hmax(mt_v);

  // B. es = exp((s - ms)/T) = 2^((s - ms) * c) and et likewise, their sums, and the unnormalized KL sum
  // sum et * ((t - mt) - (s - ms)), which p = et/Zt turns into the KL below. The logits are centred before
  // anything else: s - ms is exact where it matters (near the maximum), whatever the logits' magnitude.
  const vf c = splat(inv_temp * kLog2e);
  vf zs_v = splat(0.f), zt_v = splat(0.f), z1_v = splat(0.f), kl_v = splat(0.f);
  auto exponentials = [&](vf sv, vf tv, float* es_dst, float* et_dst) __attribute__((always_inline)) {
    vf sc = sv - ms;
    vf es = vexp2(sc * c);
    vstore(es_dst, es);
    zs_v += es;
    if (labelled) z1_v += softmax1_numerator<TPow>(es, sc);
    if (selected) {
      vf tc = tv - mt;
      vf et = vexp2(tc * c);
      vstore(et_dst, et);
      zt_v += et;
      kl_v += et * (tc - sc);
    }
  };
  constexpr int64_t kLine = 64 / sizeof(float);  // one prefetch per cache line of fp32 (more for 16-bit: harmless)
  for (int64_t i = 0; i < full; i += kLanes) {
    if (s_next && i % kLine == 0) {
      __builtin_prefetch(s_next + i, 0, 1);
      __builtin_prefetch(t_next + i, 0, 1);
    }
    exponentials(vload(s + i), selected ? vload(t + i) : vf{}, es_buf + i, et_buf + i);
  }
  // scratch holds exactly V floats per tensor, so the tail's lanes go to buffers of their own.
  float es_tail[kLanes], et_tail[kLanes];
  if (rest) {
    exponentials(load_tail(s + full, rest, pad), selected ? load_tail(t + full, rest, pad) : vf{}, es_tail,
                 et_tail);
    for (int64_t j = 0; j < rest; ++j) {
      es_buf[full + j] = es_tail[j];
      if (selected) et_buf[full + j] = et_tail[j];
    }
  }
  const double zs = hsum(zs_v), zt = selected ? hsum(zt_v) : 1.0, z1 = labelled ? hsum(z1_v) : 1.0;

  // C. the gradient, from the exponentials (and, for the MSE term, the logits): kl_coef * (es/Zs - et/Zt) +
  // ce_coef * softmax(s) + mse_coef * (s - t).
  const vf q_coef = splat(static_cast<float>(kl_coef / zs)), p_coef = splat(static_cast<float>(kl_coef / zt));
  const vf sm_coef = splat(static_cast<float>(ce_coef / z1));
  const vf d_coef = splat(mse_coef);
  // sv is read by the general-temperature path, whose softmax(s) needs an exp of its own, and with tv by the
  // MSE gradient.
  auto gradient = [&](vf es, vf et, vf sv, vf tv) __attribute__((always_inline)) {
    vf g = splat(0.f);
    if (selected) {
      g = es * q_coef - et * p_coef;
      if constexpr (MseGrad) g += (sv - tv) * d_coef;
    }
    if (labelled) g += softmax1_numerator<TPow>(es, sv - ms) * sm_coef;
    return g;
  };
  const bool reads_s = (TPow == 0 && labelled) || (MseGrad && selected);
  const bool reads_t = MseGrad && selected;
  for (int64_t i = 0; i < full; i += kLanes) {
    vf sv = reads_s ? vload(s + i) : vf{};
    vf tv = reads_t ? vload(t + i) : vf{};
    vstore(grad + i, gradient(vload(es_buf + i), selected ? vload(et_buf + i) : vf{}, sv, tv));
  }
  if (rest) {
    vf sv = reads_s ? load_tail(s + full, rest, pad) : vf{};
    vf tv = reads_t ? load_tail(t + full, rest, pad) : vf{};
    store_tail(grad + full, rest, gradient(vload(es_tail), selected ? vload(et_tail) : vf{}, sv, tv));
  }

  RowResult out;
  if (selected) {
    out.kl = hsum(kl_v) * inv_temp / zt - std::log(zt) + std::log(zs);
    out.mse = hsum(sq_v);
  }
  if (labelled) {
    const float s_label = static_cast<float>(s[label]);
    const float t_label = reads_t ? static_cast<float>(t[label]) : 0.f;
    out.ce = std::log(z1) - static_cast<double>(s_label - ms);
    // The one-hot term of the cross-entropy gradient, applied to the fp32 value before the single rounding.
    vf g = gradient(splat(es_buf[label]), splat(selected ? et_buf[label] : 0.f), splat(s_label), splat(t_label));
    grad[label] = static_cast<S>(g[0] - ce_coef);
  }
  return out;
}

// One hidden-state row: returns 1 - cos(h_s, h_t) with torch's eps on the squared norms, and writes
// cos_coef * d(1 - cos)/d h_s.
template <typename S, typename T, typename G>
static double cosine_row(const S* hs, const T* ht, G* grad, int64_t D, float cos_coef) {
  const int64_t full = D / kLanes * kLanes;
  const int64_t rest = D - full;
  vf dot_v = splat(0.f), ss_v = splat(0.f), tt_v = splat(0.f);
  for (int64_t i = 0; i < full; i += kLanes) {
    vf a = vload(hs + i), b = vload(ht + i);
    dot_v += a * b;
    ss_v += a * a;
    tt_v += b * b;
  }
  if (rest) {
    vf a = load_tail(hs + full, rest, 0.f), b = load_tail(ht + full, rest, 0.f);
    dot_v += a * b;
    ss_v += a * a;
    tt_v += b * b;
  }
  constexpr double eps = 1e-12;  // EPSILON of at::cosine_embedding_loss
  const double ss = hsum(ss_v) + eps, tt = hsum(tt_v) + eps;
  const double denom = std::sqrt(ss * tt);
  const double cos = hsum(dot_v) / denom;
  // d cos / d h_s = h_t / denom - cos * h_s / |h_s|^2
  const float a_coef = static_cast<float>(-cos_coef / denom);
  const float b_coef = static_cast<float>(cos_coef * cos / ss);
  for (int64_t i = 0; i < full; i += kLanes) {
    vstore(grad + i, vload(ht + i) * a_coef + vload(hs + i) * b_coef);
  }
  if (rest) {
    store_tail(grad + full, rest, load_tail(ht + full, rest, 0.f) * a_coef + load_tail(hs + full, rest, 0.f) * b_coef);
  }
  return 1.0 - cos;
}

// row(r, label, selected, labelled) for each of the rows [begin, end) that contributes to the loss, of either
// loss; the others (not in the KL term, no label) only get their gradient row zeroed.
template <typename S, typename F>
FASTDISTIL_INLINE void logit_rows(const uint8_t* selected_rows, const int64_t* labels, S* grad, int64_t V,
                                  int64_t begin, int64_t end, const F& row) {
  for (int64_t r = begin; r < end; ++r) {
    const bool selected = selected_rows[r];
    const int64_t label = labels[r];
    const bool labelled = label != -100;
    if (!selected && !labelled) {
      for (int64_t i = 0; i < V; ++i) grad[r * V + i] = S(0);
      continue;
    }
    row(r, label, selected, labelled);
  }
}

// The rows [begin, end) of a call: dtype and temperature dispatch of the row kernels above.
template <int TPow, bool MseGrad, typename S, typename T>
static void logits_rows(const RowsArgs& a, int64_t begin, int64_t end, float* scratch) {
  const S* s = static_cast<const S*>(a.student_logits);
  const T* t = static_cast<const T*>(a.teacher_logits);
  S* g = static_cast<S*>(a.grad_logits);
  logit_rows(a.selected, a.labels, g, a.V, begin, end, [&](int64_t r, int64_t label, bool selected, bool labelled) {
    const int64_t off = r * a.V;
    const bool last = r + 1 == end;
    RowResult res = logits_row<TPow, MseGrad>(s + off, t + off, g + off, a.V, label, selected, labelled,
                                              a.inv_temp, selected ? a.kl_coef : 0.f, labelled ? a.ce_coef : 0.f,
                                              a.mse_coef, scratch, last ? nullptr : s + off + a.V,
                                              last ? nullptr : t + off + a.V);
    a.kl_rows[r] = res.kl;
    a.ce_rows[r] = res.ce;
    a.mse_rows[r] = res.mse;
  });
}

template <typename S, typename T, typename G>
static void hidden_rows(const HiddenArgs& a, int64_t begin, int64_t end) {
  const S* hs = static_cast<const S*>(a.student_hidden);
  const T* ht = static_cast<const T*>(a.teacher_hidden);
  G* g = static_cast<G*>(a.grad_hidden);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t off = r * a.D;
    if (!a.real[r]) {
      for (int64_t i = 0; i < a.D; ++i) g[off + i] = G(0);
      continue;
    }
    a.cos_rows[r] = cosine_row(hs + off, ht + off, g + off, a.D, a.cos_coef);
  }
}

// The cosine term's rows [begin, end), of either loss: the dtype dispatch of hidden_rows.
static void cosine_rows(const HiddenArgs& a, int64_t begin, int64_t end) {
  FASTDISTIL_DISPATCH_FLOAT_TYPES(a.hidden_dtype, "triple_loss_student_hidden", [&] {
    using S = scalar_t;
    FASTDISTIL_DISPATCH_FLOAT_TYPES(a.teacher_hidden_dtype, "triple_loss_teacher_hidden", [&] {
      using T = scalar_t;
      if (a.grad_hidden_dtype == at::kFloat) {
        hidden_rows<S, T, float>(a, begin, end);
      } else {
        hidden_rows<S, T, S>(a, begin, end);
      }
    });
  });
}

template <bool MseGrad, typename S, typename T>
static void logits_rows_at_temperature(const RowsArgs& a, int64_t begin, int64_t end, float* scratch) {
  if (a.temp_pow == 1) return logits_rows<1, MseGrad, S, T>(a, begin, end, scratch);
  if (a.temp_pow == 2) return logits_rows<2, MseGrad, S, T>(a, begin, end, scratch);
  logits_rows<0, MseGrad, S, T>(a, begin, end, scratch);
}

void rows(const RowsArgs& a, int64_t begin, int64_t end, float* scratch) {
  FASTDISTIL_DISPATCH_FLOAT_TYPES(a.logits_dtype, "triple_loss_student", [&] {
    using S = scalar_t;
    FASTDISTIL_DISPATCH_FLOAT_TYPES(a.teacher_dtype, "triple_loss_teacher", [&] {
      if (a.mse_coef != 0.f) {
        logits_rows_at_temperature<true, S, scalar_t>(a, begin, end, scratch);
      } else {
        logits_rows_at_temperature<false, S, scalar_t>(a, begin, end, scratch);
      }
    });
  });
  cosine_rows(a.hidden, begin, end);
}
