// CPU row kernel of the fused linear-JSD loss: per-row loss and student-logit gradient, in place.
//
// Built at first use by opcod_kernels/cpp_rows.py with the system gcc (-O3 -march=native
// -fno-trapping-math, which lets the selects below vectorise, -fopenmp)
// and called through ctypes, so it needs no torch headers and compiles in about a second.
//
// Per row, with u_s = z_s / T_s, u_t = z_t / T_t, s = u_s - lse_s, t = u_t - lse_t:
//   d = t - s is formed as (u_t - u_s) - (lse_t - lse_s), with both log-sum-exps accumulated in
//   double. Every loss term is written so that it is >= 0 and O(d^2) near d = 0: the loss stays
//   accurate when the teacher is close to the student (the self-distillation case), where a sum of
//   O(d) terms of both signs would lose most of its digits.
//   beta = 0: KL(P||Q) = sum (p d - p + q)        [near 0: q (d^2 + (d - 1) E(d)), E = expm1 - id]
//             raw gradient r = q - p = -q expm1(d)
//   beta = 1: KL(Q||P) = sum (-q d + p - q)       [near 0: q E(d)]
//             r = -q d
//   else:     g = log(m / q) = log(beta e^d + 1 - beta) (log1p near 0, the plain log elsewhere)
//             L = sum beta p (d - g) - (1 - beta) q g   [near 0: q (beta F(d) - F(g)), F = x e^x - expm1]
//             r = -(1 - beta) q g
//   dL/du_s = r - q sum(r): exact for the true d (where sum r is 0, resp. -KL(Q||P), resp.
//   (1 - beta) KL(Q||M)), and centred with the same d, so an error in lse_t - lse_s cancels.
//   A column that is -inf in both rows (vocabulary padding) has q = p = 0 and adds nothing: a
//   probability of exactly 0 times any log-ratio (infinite or NaN) counts 0.
//
// Speed: pass 1 keeps each exp(u - running max) it sums, so pass 2 forms q and p with a multiply
// and spends its transcendentals on d alone (one series; for 0 < beta < 1 also one exp and one
// log). A `u == -inf && ...` test in the element loops made gcc 12 (which still reported them
// vectorised) run scalar code, four times slower: padding is handled by `times` instead. Check
// with objdump that the loops use ymm/zmm registers after any change.
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

// expm1(x) - x for |x| < 0.5, by its series (the subtraction would cancel).
inline float em1md_small(float x) {
  float p = 1.0f / 362880.0f;
  p = p * x + 1.0f / 40320.0f;
  p = p * x + 1.0f / 5040.0f;
  p = p * x + 1.0f / 720.0f;
  p = p * x + 1.0f / 120.0f;
  p = p * x + 1.0f / 24.0f;
  p = p * x + 1.0f / 6.0f;
  p = p * x + 0.5f;
  return x * x * p;
}

// a * b, with 0 when a == 0 (a zero probability times an infinite log-ratio).
inline float times(float a, float b) { return a == 0.0f ? 0.0f : a * b; }

// log-sum-exp of a scaled row, online over blocks; the running sum is kept in double. Each
// exp(u - m_b) is kept in e and each block's running maximum m_b in bmax, so that the second pass
// gets the probability exp(u - lse) = e * exp(m_b - lse) with a multiply instead of an exp.
inline void row_lse(const float* z, int64_t V, float inv_t, float* e, float* bmax, float* max_out,
                    double* sum_out) {
  float m = -INFINITY;
  double sum = 0.0;
  for (int64_t start = 0, b = 0; start < V; start += kBlock, ++b) {
    const int64_t len = (V - start) < kBlock ? (V - start) : kBlock;
    const float* zb = z + start;
    float* eb = e + start;
    float bm = -INFINITY;
#pragma omp simd reduction(max : bm)
    for (int64_t k = 0; k < len; ++k) {
      const float x = zb[k] * inv_t;
      bm = x > bm ? x : bm;
    }
    if (bm > m) {
      sum *= std::exp(static_cast<double>(m) - static_cast<double>(bm));
      m = bm;
    }
    bmax[b] = m;
    float bs = 0.0f;
#pragma omp simd reduction(+ : bs)
    for (int64_t k = 0; k < len; ++k) {
      const float x = vexp(zb[k] * inv_t - m);
      eb[k] = x;
      bs += x;
    }
    sum += bs;
  }
  *max_out = m;
  *sum_out = sum;
}

void one_row(float* zs, const float* zt, float* eq, float* ep, float* bms, float* bmt, int64_t V,
             float inv_ts, float inv_tt, float beta, float gscale, bool write_grad, float* loss_out) {
  float ms, mt;
  double ss, st;
  row_lse(zs, V, inv_ts, eq, bms, &ms, &ss);
  row_lse(zt, V, inv_tt, ep, bmt, &mt, &st);
  const double lse_s = ms + std::log(ss);
  const float ls = static_cast<float>(lse_s);
  // lse_t - lse_s without subtracting two large numbers: the maxima are exact, the sums are close.
  const double dld = (static_cast<double>(mt) - ms) + std::log(st / ss);
  const float dl = static_cast<float>(dld);
  const double lse_t = lse_s + dld;
  const bool reverse = beta == 1.0f;
  const float omb = 1.0f - beta;
  const float lbeta = std::log(beta > 0.0f ? beta : 1.0f);

  // Pass 2: the loss, the raw gradient r (kept in zs) and q (in eq); the gradient is
  // r - q sum(r), centred with the same d so that an error in lse_t - lse_s cancels.
  double acc = 0.0, acc_r = 0.0;
  for (int64_t start = 0, blk = 0; start < V; start += kBlock, ++blk) {
    const int64_t len = (V - start) < kBlock ? (V - start) : kBlock;
    float* a = zs + start;
    const float* b = zt + start;
    float* wq = eq + start;
    const float* wp = ep + start;
    const float sq = static_cast<float>(std::exp(static_cast<double>(bms[blk]) - lse_s));
    const float sp = static_cast<float>(std::exp(static_cast<double>(bmt[blk]) - lse_t));
    float bl = 0.0f, br = 0.0f;
    if (beta == 0.0f) {
#pragma omp simd reduction(+ : bl, br)
      for (int64_t k = 0; k < len; ++k) {
        const float us = a[k] * inv_ts;
        const float ut = b[k] * inv_tt;
                const float d = (ut - us) - dl;
        const float q = wq[k] * sq;
        const float p = wp[k] * sp;
        const bool near = d > -0.5f && d < 0.5f;
        const float e = em1md_small(near ? d : 0.0f);
        bl += near ? q * (d * d + (d - 1.0f) * e) : times(p, d) - p + q;
        const float r = near ? -q * (d + e) : q - p;
        br += r;
        a[k] = r;
        wq[k] = q;
      }
    } else if (reverse) {
#pragma omp simd reduction(+ : bl, br)
      for (int64_t k = 0; k < len; ++k) {
        const float us = a[k] * inv_ts;
        const float ut = b[k] * inv_tt;
                const float d = (ut - us) - dl;
        const float q = wq[k] * sq;
        const float p = wp[k] * sp;
        const float qd = times(q, d);
        const bool near = d > -0.5f && d < 0.5f;
        bl += near ? q * em1md_small(near ? d : 0.0f) : -qd + p - q;
        br -= qd;
        a[k] = -qd;
        wq[k] = q;
      }
    } else {
#pragma omp simd reduction(+ : bl, br)
      for (int64_t k = 0; k < len; ++k) {
        const float us = a[k] * inv_ts;
        const float ut = b[k] * inv_tt;
                const float d = (ut - us) - dl;
        const float q = wq[k] * sq;
        const float p = wp[k] * sp;
        const bool near = d > -0.5f && d < 0.5f;
        // g = log(m / q) = log(beta e^d + 1 - beta). Near 0: log1p(y), y = beta expm1 d, by Kahan's
        // log1p (u = 1 + y rounds, u - 1 is exact, y / (u - 1) undoes the rounding), each term O(d^2)
        // by series. Elsewhere the log of beta e^d + 1 - beta itself, which is >= 1 - beta and
        // away from 1; for d > 80, where e^d overflows, d + log(beta). One log serves both.
        const float dn = near ? d : 0.0f;
        const float ed = em1md_small(dn);
        const float y = beta * (dn + ed);
        const float u = 1.0f + y;
        const float um1 = u - 1.0f;
        const float lg = vlog(near ? u : beta * vexp(d > 80.0f ? 0.0f : d) + omb);
        const float g = near ? (um1 == 0.0f ? y : lg * (y / um1)) : (d > 80.0f ? d + lbeta : lg);
        const float gc = near ? g : 0.0f;
        const float dmg = d > 80.0f ? -lbeta : d - g;  // the limit, where d - g would be inf - inf
        const float qg = times(q, g);
        bl += near ? q * (beta * (dn * dn + (dn - 1.0f) * ed) - (gc * gc + (gc - 1.0f) * em1md_small(gc)))
                   : beta * times(p, dmg) - omb * qg;
        br -= omb * qg;
        a[k] = -omb * qg;
        wq[k] = q;
      }
    }
    acc += bl;
    acc_r += br;
  }
  *loss_out = static_cast<float>(acc);
  if (!write_grad) return;
  const float c = static_cast<float>(acc_r);
#pragma omp simd
  for (int64_t k = 0; k < V; ++k) zs[k] = (zs[k] - times(eq[k], c)) * gscale;
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
    const int64_t blocks = (V + kBlock - 1) / kBlock;
    std::vector<float> scratch(2 * V + 2 * blocks);
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
      float* w = scratch.data();
      one_row(a, b, w, w + V, w + 2 * V, w + 2 * V + blocks, V, inv_ts, inv_tt, beta, sc * inv_ts, write_grad != 0, &loss[r]);
    }
  }
  return 0;
}

}  // extern "C"
