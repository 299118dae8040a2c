// CPU row kernel of the fused linear-JSD loss: per-row loss and student-logit gradient, in place.
//
// Built at first use by opcod_kernels/cpp_rows.py with the system gcc (-O3 -march=native
// -fno-trapping-math, which lets the selects below vectorise, -fopenmp)
// and called through ctypes, so it needs no torch headers and compiles in about a second.
//
// Per row, with u_s = z_s / T_s, u_t = z_t / T_t, s = u_s - lse_s, t = u_t - lse_t:
//   d = t - s is formed as (u_t - u_s) - (lse_t - lse_s), with both log-sum-exps accumulated in
//   double. Every loss and gradient term is then written in d, so the result stays accurate when the
//   teacher is close to the student (the self-distillation case), where the loss is O(d^2).
//   beta = 0: KL(P||Q) = sum p d,            dL/du_s = q - p = -q expm1(d)
//   beta = 1: KL(Q||P) = -sum q d,           dL/du_s = q (-d - L)
//   else:     g = m - s = log(beta e^d + 1 - beta) (a two-term log-sum-exp, written with log1p)
//             L = beta sum p (d - g) + (1 - beta) sum (-q g),  dL/du_s = (1 - beta) q (-g - KL(Q||M))
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 512;  // elements per online-softmax block: both rows stay in L1

inline float bits_to_float(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

// exp for the vectoriser: Cody-Waite reduction, degree-7 Taylor on [-ln2/2, ln2/2], 2^n by bits.
// About 1 ulp; flushes to 0 below e^-87 (such terms are below fp32 resolution of any row sum).
inline float vexp(float x) {
  const float xc = x > 88.3f ? 88.3f : (x < -87.0f ? -87.0f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

// log for x > 0 (normal): x = 2^e m, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(f / (2 + f)).
inline float vlog(float x) {
  uint32_t b = float_to_bits(x);
  int32_t e = static_cast<int32_t>(b >> 23) - 127;
  float m = bits_to_float((b & 0x007fffffu) | 0x3f800000u);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const float ef = static_cast<float>(e);
  return ef * 0.693145751953125f + (ef * 1.428606765330187045e-06f + 2.0f * s * p);
}

// expm1: Taylor series where exp(x) - 1 would cancel, exp(x) - 1 elsewhere.
inline float vexpm1(float x) {
  float p = 1.0f / 362880.0f;
  p = p * x + 1.0f / 40320.0f;
  p = p * x + 1.0f / 5040.0f;
  p = p * x + 1.0f / 720.0f;
  p = p * x + 1.0f / 120.0f;
  p = p * x + 1.0f / 24.0f;
  p = p * x + 1.0f / 6.0f;
  p = p * x + 0.5f;
  const float small = x + x * x * p;
  return (x > -0.5f && x < 0.5f) ? small : vexp(x) - 1.0f;
}

// log1p for y > -1 (Kahan): u = 1 + y rounds, u - 1 is exact, and y / (u - 1) undoes the rounding.
inline float vlog1p(float y) {
  const float u = 1.0f + y;
  const float um1 = u - 1.0f;
  return um1 == 0.0f ? y : vlog(u) * (y / um1);
}

// log-sum-exp of a scaled row, online over blocks; the running sum is kept in double.
inline void row_lse(const float* z, int64_t V, float inv_t, float* max_out, double* sum_out) {
  float m = -INFINITY;
  double sum = 0.0;
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t len = (V - start) < kBlock ? (V - start) : kBlock;
    const float* zb = z + start;
    float bm = -INFINITY;
#pragma omp simd reduction(max : bm)
    for (int64_t k = 0; k < len; ++k) bm = std::fmax(bm, zb[k] * inv_t);
    if (bm > m) {
      sum *= std::exp(static_cast<double>(m) - static_cast<double>(bm));
      m = bm;
    }
    float bs = 0.0f;
#pragma omp simd reduction(+ : bs)
    for (int64_t k = 0; k < len; ++k) bs += vexp(zb[k] * inv_t - m);
    sum += bs;
  }
  *max_out = m;
  *sum_out = sum;
}

void one_row(float* zs, const float* zt, float* scratch, int64_t V, float inv_ts, float inv_tt,
             float beta, float gscale, bool write_grad, float* loss_out) {
  float ms, mt;
  double ss, st;
  row_lse(zs, V, inv_ts, &ms, &ss);
  row_lse(zt, V, inv_tt, &mt, &st);
  const double lse_s = ms + std::log(ss);
  const float ls = static_cast<float>(lse_s);
  // lse_t - lse_s without subtracting two large numbers: the maxima are exact, the sums are close.
  const float dl = static_cast<float>((static_cast<double>(mt) - ms) + std::log(st / ss));

  if (beta == 0.0f) {
    double acc = 0.0;
    for (int64_t start = 0; start < V; start += kBlock) {
      const int64_t len = (V - start) < kBlock ? (V - start) : kBlock;
      float* a = zs + start;
      const float* b = zt + start;
      float bl = 0.0f;
#pragma omp simd reduction(+ : bl)
      for (int64_t k = 0; k < len; ++k) {
        const float us = a[k] * inv_ts;
        const float s = us - ls;
        const float d = (b[k] * inv_tt - us) - dl;
        const float q = vexp(s);
        const float p = vexp(s + d);
        bl += p * d;
        const float dc = d > 0.5f ? 0.5f : (d < -0.5f ? -0.5f : d);
        const float g = (d > -0.5f && d < 0.5f) ? -q * vexpm1(dc) : q - p;
        if (write_grad) a[k] = g * gscale;
      }
      acc += bl;
    }
    *loss_out = static_cast<float>(acc);
    return;
  }

  // beta > 0: the gradient needs a row sum first; pass 2 leaves a - c * b for pass 3.
  const bool reverse = beta == 1.0f;
  const float omb = 1.0f - beta;
  double acc_p = 0.0, acc_q = 0.0;
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t len = (V - start) < kBlock ? (V - start) : kBlock;
    float* a = zs + start;
    const float* b = zt + start;
    float* w = scratch + start;
    float bp = 0.0f, bq = 0.0f;
    if (reverse) {
#pragma omp simd reduction(+ : bq)
      for (int64_t k = 0; k < len; ++k) {
        const float us = a[k] * inv_ts;
        const float s = us - ls;
        const float d = (b[k] * inv_tt - us) - dl;
        const float q = vexp(s);
        bq -= q * d;
        a[k] = -q * d;
        w[k] = q;
      }
    } else {
#pragma omp simd reduction(+ : bp, bq)
      for (int64_t k = 0; k < len; ++k) {
        const float us = a[k] * inv_ts;
        const float s = us - ls;
        const float d = (b[k] * inv_tt - us) - dl;
        const float q = vexp(s);
        const float p = vexp(s + d);
        // g = log(beta e^d + 1 - beta), factored on the larger of the two terms:
        // d > 0: d + log1p((1 - beta) expm1(-d)); else log1p(beta expm1(d)).
        const bool pos = d > 0.0f;
        const float h = vlog1p((pos ? omb : beta) * vexpm1(pos ? -d : d));
        const float g = pos ? d + h : h;
        const float dmg = pos ? -h : d - h;
        bp += p * dmg;
        bq -= q * g;
        a[k] = -omb * q * g;
        w[k] = omb * q;
      }
    }
    acc_p += bp;
    acc_q += bq;
  }
  const float c = static_cast<float>(acc_q);  // KL(Q||M), or the reverse-KL loss itself
  *loss_out = reverse ? c : static_cast<float>(beta * acc_p + omb * acc_q);
  if (!write_grad) return;
#pragma omp simd
  for (int64_t k = 0; k < V; ++k) zs[k] = (zs[k] - c * scratch[k]) * gscale;
}

}  // namespace

extern "C" {

// zs: [C, V] student logits (row stride stride_s), overwritten by scale_r / T_s * dL_r/du_s when
// write_grad; zt: [C, V] teacher logits, read only; row_scale: [C], a row with 0 is skipped (loss 0,
// gradient 0); loss: [C] per-row loss (unscaled). Returns 0.
int opcod_jsd_rows(float* zs, int64_t stride_s, const float* zt, int64_t stride_t,
                   const float* row_scale, float* loss, int64_t C, int64_t V, float inv_ts,
                   float inv_tt, float beta, int write_grad, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> scratch(beta == 0.0f ? 0 : V);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < C; ++r) {
      float* a = zs + r * stride_s;
      const float* b = zt + r * stride_t;
      const float sc = row_scale[r];
      if (sc == 0.0f) {
        loss[r] = 0.0f;
        if (write_grad) std::memset(a, 0, sizeof(float) * V);
        continue;
      }
      one_row(a, b, scratch.data(), V, inv_ts, inv_tt, beta, sc * inv_ts, write_grad != 0, &loss[r]);
    }
  }
  return 0;
}

}  // extern "C"
