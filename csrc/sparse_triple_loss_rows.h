// Row kernels of the triple loss against a cached top-k teacher (sparse_triple_loss_cpu.cpp). Each
// triple_loss_rows_<isa>.cpp includes this file after triple_loss_rows.h, in the same namespace, so it is compiled
// once per instruction set with the online kernels' vector helpers and their cosine rows. No include guard, for
// the same reason as there.
//
// The teacher is k logits, k indices and a log-sum-exp instead of a [V] row, so a student row takes the online
// kernel's three sweeps with no teacher stream:
//   A. max_s;
//   B. es = exp((s - max_s)/T) into fp32 scratch, its sum Zs, the T = 1 normalizer (es^T, as online) and, when
//      the teacher leaves mass to a tail bucket, the student's tail sum_{v not in top-k} es_v: the top-k entries
//      are marked in a bitmap before the sweep, so the tail is a sum of tail entries and never Zs minus the
//      top-k, which cancels when the student's mass sits in the top-k;
//   C. every entry's gradient as if it were in the tail, then k scalar fix-ups that overwrite the top-k entries
//      (and the label's), so that each element is still rounded into the student's dtype once.
// The k teacher entries are scalar double work: q_k = exp(t_k/T - lse_T), exact whatever k, and their sum Q.

// fp32's smallest normal (reference.py's TAIL_FLOOR): the floor of the student's tail mass.
static constexpr double kTailFloor = 0x1p-126;

// The top-k marks are a bitmap (entry v: bit v % 8 of byte v / 8): 3.8 KB at V = 30522, which stays in L1.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "tail_lanes reads the bitmap's bytes as one word");

FASTDISTIL_INLINE void mark(uint8_t* marks, int64_t v) { marks[v >> 3] |= static_cast<uint8_t>(1u << (v & 7)); }

// The lanes of entries i .. i + kLanes - 1 (i a multiple of kLanes) that are not marked: -1 in the tail.
FASTDISTIL_INLINE vi tail_lanes(const uint8_t* marks, int64_t i) {
  uint32_t word;
  __builtin_memcpy(&word, marks + (i >> 3), sizeof(word));
  vi bit;
  for (int j = 0; j < kLanes; ++j) bit[j] = 1 << j;
  return ((vi{} + static_cast<int32_t>(word >> (i & 7))) & bit) == 0;
}

// Row r's top-k teacher at temperature T: its indices, log q_k and q_k into the scratch; returns Q = sum_k q_k.
template <typename T, typename I>
static double topk_teacher(const SparseRowsArgs& a, int64_t r, const SparseScratch& w) {
  const T* t = static_cast<const T*>(a.topk_logits) + r * a.K;
  const I* idx = static_cast<const I*>(a.topk_indices) + r * a.K;
  const double lse = static_cast<const float*>(a.logsumexp)[2 * r + 1];
  double mass = 0.0;
  for (int64_t j = 0; j < a.K; ++j) {
    w.index[j] = static_cast<int64_t>(idx[j]);
    w.log_q[j] = static_cast<double>(static_cast<float>(t[j])) / a.temperature - lse;
    w.q[j] = std::exp(w.log_q[j]);
    mass += w.q[j];
  }
  return mass;
}

using TopkTeacherFn = double (*)(const SparseRowsArgs&, int64_t, const SparseScratch&);

// One student row against the teacher that topk_teacher left in w (mass = Q). With c the factor of the top-k
// (1, or 1/Q to renormalize), r the bucket's mass, S the student's tail mass and u = [S >= kTailFloor], the
// gradient of KL with respect to z = s/T is a p_j - c q_j on the top-k and (a - u r / S) p_j off it, where
// a = c Q + u r. kl_coef and ce_coef already carry alpha / n and P.
template <int TPow, typename S>
static RowResult sparse_logits_row(const SparseRowsArgs& a, const S* s, S* grad, int64_t label, bool selected,
                                   bool labelled, double mass, const SparseScratch& w, const S* s_next) {
  const int64_t V = a.V, K = a.K;
  const int64_t full = V / kLanes * kLanes;
  const int64_t rest = V - full;
  const float pad = std::numeric_limits<float>::lowest();  // exp gives 0 past V, as in logits_row
  float* es_buf = w.es;
  const uint8_t* marks = w.in_topk;  // a local: the stores to es_buf could otherwise alias w
  const double kl_coef = selected ? a.kl_coef : 0.0;
  const float ce_coef = labelled ? a.ce_coef : 0.f;

  // With k = V there is no tail, whatever the rounding of Q says.
  double c = 1.0, r = 0.0;
  if (selected && a.bucket) {
    r = K < V && mass < 1.0 ? 1.0 - mass : 0.0;
  } else if (selected) {
    c = 1.0 / mass;
  }
  const bool tail = r > 0;
  if (tail) {
    for (int64_t j = 0; j < K; ++j) mark(w.in_topk, w.index[j]);
  }

  // A.
  vf ms_v = splat(pad);
  for (int64_t i = 0; i < full; i += kLanes) ms_v = vmax(ms_v, vload(s + i));
  if (rest) ms_v = vmax(ms_v, load_tail(s + full, rest, pad));
  const float ms = hmax(ms_v);

  // B.
  const vf cexp = splat(a.inv_temp * kLog2e);
  vf zs_v = splat(0.f), z1_v = splat(0.f), tail_v = splat(0.f);
  auto exponentials = [&](vf sv, int64_t i, float* es_dst) __attribute__((always_inline)) {
    vf sc = sv - ms;
    vf es = vexp2(sc * cexp);
    vstore(es_dst, es);
    zs_v += es;
    if (labelled) z1_v += softmax1_numerator<TPow>(es, sc);
    if (tail) tail_v += select(tail_lanes(marks, i), es, splat(0.f));
  };
  constexpr int64_t kLine = 64 / sizeof(float);
  for (int64_t i = 0; i < full; i += kLanes) {
    if (s_next && i % kLine == 0) __builtin_prefetch(s_next + i, 0, 1);
    exponentials(vload(s + i), i, es_buf + i);
  }
  float es_tail[kLanes];
  if (rest) {
    exponentials(load_tail(s + full, rest, pad), full, es_tail);  // past V es is 0, marked or not
    for (int64_t j = 0; j < rest; ++j) es_buf[full + j] = es_tail[j];
  }
  const double zs = hsum(zs_v), z1 = labelled ? hsum(z1_v) : 1.0, tail_sum = hsum(tail_v);

  // C. p_j = es_j / Zs and p_j / S = es_j / tail_sum: the tail's gradient never divides by a rounded S.
  const bool u = tail && tail_sum / zs >= kTailFloor;
  const double a_coef = c * mass + (u ? r : 0.0);
  const double tail_coef = kl_coef * (a_coef / zs - (u ? r / tail_sum : 0.0));
  const vf g_coef = splat(static_cast<float>(tail_coef));
  const vf sm_coef = splat(static_cast<float>(ce_coef / z1));
  // ce_coef * softmax(s) at T = 1; sv is read by the general-temperature path only.
  auto mlm = [&](vf es, vf sv) __attribute__((always_inline)) {
    return softmax1_numerator<TPow>(es, sv - ms) * sm_coef;
  };
  const bool reads_s = TPow == 0 && labelled;
  for (int64_t i = 0; i < full; i += kLanes) {
    const vf es = vload(es_buf + i);
    vstore(grad + i, labelled ? es * g_coef + mlm(es, reads_s ? vload(s + i) : vf{}) : es * g_coef);
  }
  if (rest) {
    const vf es = vload(es_tail);
    store_tail(grad + full, rest,
               labelled ? es * g_coef + mlm(es, reads_s ? load_tail(s + full, rest, pad) : vf{}) : es * g_coef);
  }

  // The fix-ups: one entry's KL part plus its MLM part, in fp32 and rounded once.
  auto entry = [&](int64_t v, float kl_part) __attribute__((always_inline)) {
    float g = kl_part;
    if (labelled) g += mlm(splat(es_buf[v]), splat(static_cast<float>(s[v])))[0];
    if (v == label) g -= ce_coef;
    return static_cast<S>(g);
  };
  RowResult out;
  bool label_in_topk = false;
  if (selected) {
    const double log_zs = std::log(zs), log_c = std::log(c);
    double kl = 0.0;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t v = w.index[j];
      // log p from the logit, not from es: exact for the entries whose es underflows.
      const double log_p = (static_cast<double>(static_cast<float>(s[v])) - ms) / a.temperature - log_zs;
      const double target = c * w.q[j];
      kl += target * (log_c + w.log_q[j] - log_p);
      grad[v] = entry(v, static_cast<float>(kl_coef * (a_coef * es_buf[v] / zs - target)));
      label_in_topk |= v == label;
    }
    if (tail) {
      const double log_tail = u ? std::log(tail_sum) - log_zs : std::log(kTailFloor);
      kl += r * (std::log(r > kTailFloor ? r : kTailFloor) - log_tail);
      for (int64_t j = 0; j < K; ++j) w.in_topk[w.index[j] >> 3] = 0;
    }
    out.kl = kl;
  }
  if (labelled) {
    out.ce = std::log(z1) - static_cast<double>(static_cast<float>(s[label]) - ms);
    if (!label_in_topk) grad[label] = entry(label, static_cast<float>(tail_coef) * es_buf[label]);
  }
  return out;
}

template <int TPow, typename S>
static void sparse_logits_rows(const SparseRowsArgs& a, int64_t begin, int64_t end, const SparseScratch& w,
                               TopkTeacherFn teacher) {
  const S* s = static_cast<const S*>(a.student_logits);
  S* g = static_cast<S*>(a.grad_logits);
  logit_rows(a.selected, a.labels, g, a.V, begin, end, [&](int64_t r, int64_t label, bool selected, bool labelled) {
    const int64_t off = r * a.V;
    const double mass = selected ? teacher(a, r, w) : 0.0;
    const bool last = r + 1 == end;
    RowResult res = sparse_logits_row<TPow>(a, s + off, g + off, label, selected, labelled, mass, w,
                                            last ? nullptr : s + off + a.V);
    a.kl_rows[r] = res.kl;
    a.ce_rows[r] = res.ce;
  });
}

static TopkTeacherFn topk_teacher_for(const SparseRowsArgs& a) {
  TopkTeacherFn fn = nullptr;
  FASTDISTIL_DISPATCH_FLOAT_TYPES(a.topk_dtype, "sparse_triple_loss_teacher", [&] {
    using T = scalar_t;
    AT_DISPATCH_SWITCH(a.index_dtype, "sparse_triple_loss_indices",
                       AT_DISPATCH_CASE(at::kShort, [&] { fn = &topk_teacher<T, scalar_t>; })
                       AT_DISPATCH_CASE(at::kInt, [&] { fn = &topk_teacher<T, scalar_t>; })
                       AT_DISPATCH_CASE(at::kLong, [&] { fn = &topk_teacher<T, scalar_t>; }));
  });
  return fn;
}

void sparse_rows(const SparseRowsArgs& a, int64_t begin, int64_t end, const SparseScratch& w) {
  const TopkTeacherFn teacher = topk_teacher_for(a);
  FASTDISTIL_DISPATCH_FLOAT_TYPES(a.logits_dtype, "sparse_triple_loss_student", [&] {
    if (a.temp_pow == 1) return sparse_logits_rows<1, scalar_t>(a, begin, end, w, teacher);
    if (a.temp_pow == 2) return sparse_logits_rows<2, scalar_t>(a, begin, end, w, teacher);
    sparse_logits_rows<0, scalar_t>(a, begin, end, w, teacher);
  });
  cosine_rows(a.hidden, begin, end);
}
