// HIP-NN's energies, forces and their weight gradient in C++: the kernels of hipnn_forces.py and
// hipnn_force_training.py, operation for operation.
//
// `forward` runs the forward pass and the force pass (atom energies and dE/d(distance) of every
// neighbour slot) and keeps their trace; `backward` is the written-out gradient of a loss on both
// with respect to every weight (and the input features). `forward_forces` / `backward_forces` do the
// same from positions to forces (displacements, distances and the force assembly here too). Matrix
// products stay ATen's (MKL); what this adds is no Python between the ~150 (forward) and ~300
// (backward) operations of a step, the per-atom slot products as vector loops, and fused loops for
// the element-wise work: the cutoff terms, the sensitivities with their distance slopes, softplus and
// sigmoid from one exponential, the slot sum of the sensitivity gradient, the activation adjoint and
// the sensitivity adjoint. Built on first use by hipnn_native.py.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

using torch::Tensor;

// glibc's vector variants (libmvec) of exp, log, sin and cos, so that the element-wise loops below vectorise
// without -ffast-math (which would also license rewriting (1 + e) - 1 as e); glibc declares them
// itself only under -ffast-math.
extern "C" {
float expf(float) __attribute__((simd("notinbranch")));
float logf(float) __attribute__((simd("notinbranch")));
float sinf(float) __attribute__((simd("notinbranch")));
float cosf(float) __attribute__((simd("notinbranch")));
double exp(double) __attribute__((simd("notinbranch")));
double log(double) __attribute__((simd("notinbranch")));
double sin(double) __attribute__((simd("notinbranch")));
double cos(double) __attribute__((simd("notinbranch")));
}

namespace {

constexpr double kGaussianExponentFloor = -50.0;  // GAUSSIAN_EXPONENT_FLOOR of hipnn.py
constexpr double kSoftplusThreshold = 20.0;       // torch.nn.functional.softplus: h above it gives h

using Chunks = std::vector<std::pair<int64_t, int64_t>>;

// `value`, hidden from constant folding. exp(x < floor ? floor : x) with a constant floor is rewritten
// by GCC as x < floor ? exp(floor) : exp(x), so the vector exp sees the unfloored x, and libmvec
// computes lanes outside its range (|x| > 87 in float32) one at a time, ~4x slower (measured).
template <typename T>
T opaque(T value) {
  asm volatile("" : "+m"(value));
  return value;
}

// Per-slot terms of one cutoff, each (n, k): 1/r, c(r) = cos^2(pi r / 2 r_c) inside r_c (0 beyond), c'(r), c / r^2.
struct Geometry {
  Tensor inverse, cutoff, slope, cutoff_over_r2;
};

template <typename T>
Geometry geometry(const Tensor& distance, double cutoff_angstrom) {
  Geometry g{torch::empty_like(distance), torch::empty_like(distance), torch::empty_like(distance), torch::empty_like(distance)};
  const T* r = distance.data_ptr<T>();
  T *inverse = g.inverse.data_ptr<T>(), *cutoff = g.cutoff.data_ptr<T>(), *slope = g.slope.data_ptr<T>(), *over_r2 = g.cutoff_over_r2.data_ptr<T>();
  const T scale = T(0.5 * M_PI / cutoff_angstrom), r_c = T(cutoff_angstrom);
  const int64_t n = distance.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T inside = r[i] <= r_c ? T(1) : T(0), inv = T(1) / r[i], cosine = std::cos(scale * r[i]);
    inverse[i] = inv;
    cutoff[i] = cosine * cosine * inside;
    slope[i] = std::sin(T(2) * scale * r[i]) * inside * (-scale);
    over_r2[i] = cutoff[i] * inv * inv;
  }
  return g;
}

// s_v = g c and ds_v/dr = g (u sigma c / r^2 + c'), u = (1/r - 1/mu) sigma, g = exp(max(-u^2 / 2, floor)),
// each (atoms, k, v) for the atoms [first, last).
template <typename T>
std::pair<Tensor, Tensor> sensitivities(const Geometry& g, const Tensor& mu, const Tensor& sigma, int64_t first, int64_t last) {
  const int64_t n_slots = g.inverse.size(1), n_sens = mu.size(1);
  Tensor values = torch::empty({last - first, n_slots, n_sens}, g.inverse.options());
  Tensor slopes = torch::empty_like(values);
  const T* mu_p = mu.data_ptr<T>();
  const T* sigma_p = sigma.data_ptr<T>();
  const T exponent_floor = opaque(T(kGaussianExponentFloor));
  std::vector<T> inverse_mu(n_sens);
  for (int64_t v = 0; v < n_sens; ++v) inverse_mu[v] = T(1) / mu_p[v];
  const T *inverse = g.inverse.data_ptr<T>(), *cutoff = g.cutoff.data_ptr<T>(), *slope = g.slope.data_ptr<T>(), *over_r2 = g.cutoff_over_r2.data_ptr<T>();
  T* values_p = values.data_ptr<T>();
  T* slopes_p = slopes.data_ptr<T>();
  for (int64_t slot = first * n_slots; slot < last * n_slots; ++slot) {
    const T inv = inverse[slot], c = cutoff[slot], c_slope = slope[slot], q = over_r2[slot];
    T* s = values_p + (slot - first * n_slots) * n_sens;
    T* ds = slopes_p + (slot - first * n_slots) * n_sens;
#pragma omp simd
    for (int64_t v = 0; v < n_sens; ++v) {
      const T u = (inv - inverse_mu[v]) * sigma_p[v];
      T exponent = T(-0.5) * u * u;
      exponent = exponent < exponent_floor ? exponent_floor : exponent;
      const T gaussian = std::exp(exponent);
      s[v] = gaussian * c;
      ds[v] = gaussian * (u * sigma_p[v] * q + c_slope);
    }
  }
  return {values, slopes};
}

// log1p(e) for e in [0, 1]. float32: 2 atanh(z), z = e / (2 + e) <= 1/3, by its series to z^15 (truncation
// < 2e-9 relative, below float32's rounding), no call to libmvec's logf (~30% of softplus' time);
// float64: log(1 + e) e / ((1 + e) - 1), exact where 1 + e rounds.
template <typename T>
inline T log1p_unit(T e);

template <>
inline float log1p_unit<float>(float e) {
  const float z = e / (2.0f + e), w = z * z;
  const float series = 1.0f + w * (1.0f / 3 + w * (1.0f / 5 + w * (1.0f / 7 + w * (1.0f / 9 + w * (1.0f / 11 + w * (1.0f / 13 + w * (1.0f / 15)))))));
  return 2.0f * z * series;
}

template <>
inline double log1p_unit<double>(double e) {
  const double one_plus_e = 1.0 + e, rounded = one_plus_e - 1.0, log_value = std::log(one_plus_e);
  return rounded == 0.0 ? e : log_value * (e / (rounded == 0.0 ? 1.0 : rounded));
}

// softplus(h) (torch's: h itself above the threshold) and sigmoid(h), both from e = exp(-|h|):
// softplus = max(h, 0) + log1p(e), sigmoid = 1 / (1 + e) for h >= 0 and e / (1 + e) below. The
// exponent is floored where exp() would leave the normal numbers (|h| > 87 in float32, 708 in float64):
// libmvec computes such lanes one by one, ~10x slower; the floor changes results by < 1.2e-38 (2.3e-308).
template <typename T>
std::pair<Tensor, Tensor> activation(const Tensor& pre_activation) {
  Tensor softplus = torch::empty_like(pre_activation), sigmoid = torch::empty_like(pre_activation);
  const T* h = pre_activation.data_ptr<T>();
  T* softplus_p = softplus.data_ptr<T>();
  T* sigmoid_p = sigmoid.data_ptr<T>();
  const int64_t n = pre_activation.numel();
  const T exponent_floor = opaque(std::log(std::numeric_limits<T>::min()));  // keeps exp() normal: see the comment above
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T x = h[i], minus_abs = -std::abs(x), floored = minus_abs < exponent_floor ? exponent_floor : minus_abs;
    const T e = minus_abs < exponent_floor ? T(0) : std::exp(floored);
    softplus_p[i] = x > T(kSoftplusThreshold) ? x : (x > T(0) ? x : T(0)) + log1p_unit(e);
    sigmoid_p[i] = (x >= T(0) ? T(1) : e) / (T(1) + e);
  }
  return {softplus, sigmoid};
}

// d(loss)/dh from d(loss)/d(softplus(h)) (in `cotangent`, overwritten) and d(loss)/d(sigmoid(h)):
// sigmoid (a + c (1 - sigmoid)).
template <typename T>
Tensor activation_adjoint(Tensor cotangent, const Tensor& sigmoid, const Tensor& sigmoid_cotangent) {
  T* a = cotangent.data_ptr<T>();
  const T* s = sigmoid.data_ptr<T>();
  const T* c = sigmoid_cotangent.data_ptr<T>();
  const int64_t n = cotangent.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = (a[i] + c[i] * (T(1) - s[i])) * s[i];
  return cotangent;
}

// out[slot] += sum_v dE/ds_v ds_v/dr over the slots of a chunk (each (slots, v); out (slots,)).
template <typename T>
void add_slot_sums(const Tensor& sensitivity_gradient, const Tensor& sensitivity_slopes, Tensor out) {
  const int64_t n_sens = sensitivity_gradient.size(-1), n = out.numel();
  const T* g = sensitivity_gradient.data_ptr<T>();
  const T* ds = sensitivity_slopes.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t slot = 0; slot < n; ++slot) {
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t v = 0; v < n_sens; ++v) sum += g[slot * n_sens + v] * ds[slot * n_sens + v];
    o[slot] += sum;
  }
}

// The gradients of mu and sigma (adjoint of `sensitivities`) from d(loss)/ds and d(loss)/d(ds/dr) of
// the atoms [first, last), added to the per-sensitivity sums (see sensitivity_adjoint in
// hipnn_force_training.py): with u recomputed, slope term t = c_ds g c/r^2 = c_ds s/r^2 (no exponential:
// s = g c), value term w = c_s s + c_ds ds/dr and offset cotangent o = t sigma - u w, it adds o to
// `mu_sum` and (o + t sigma) u to `sigma_sum`; the caller scales them by sigma / mu^2 and 1 / sigma.
template <typename T>
void add_sensitivity_adjoint(const Geometry& g, const Tensor& mu, const Tensor& sigma, int64_t first, int64_t last, const Tensor& values,
                             const Tensor& slopes, const Tensor& values_cotangent, const Tensor& slopes_cotangent,
                             std::vector<double>& mu_sum, std::vector<double>& sigma_sum) {
  const int64_t n_slots = g.inverse.size(1), n_sens = mu.size(1);
  const T* mu_p = mu.data_ptr<T>();
  const T* sigma_p = sigma.data_ptr<T>();
  std::vector<T> inverse_mu(n_sens);
  for (int64_t v = 0; v < n_sens; ++v) inverse_mu[v] = T(1) / mu_p[v];
  const T* inverse = g.inverse.data_ptr<T>();
  const T *s = values.data_ptr<T>(), *ds = slopes.data_ptr<T>(), *c_s = values_cotangent.data_ptr<T>(), *c_ds = slopes_cotangent.data_ptr<T>();
  double* mu_acc = mu_sum.data();
  double* sigma_acc = sigma_sum.data();
  for (int64_t slot = first * n_slots; slot < last * n_slots; ++slot) {
    const T inv = inverse[slot], inv2 = inv * inv;
    const int64_t row = (slot - first * n_slots) * n_sens;
#pragma omp simd
    for (int64_t v = 0; v < n_sens; ++v) {
      const T u = (inv - inverse_mu[v]) * sigma_p[v];
      const T slope_term = c_ds[row + v] * s[row + v] * inv2;
      const T value_term = c_s[row + v] * s[row + v] + c_ds[row + v] * ds[row + v];
      const T offset_cotangent = slope_term * sigma_p[v] - u * value_term;
      mu_acc[v] += offset_cotangent;
      sigma_acc[v] += (offset_cotangent + slope_term * sigma_p[v]) * u;
    }
  }
}

// Per-atom products over the neighbour slots: for each atom, matrices of k slots x v sensitivities
// (sensitivities, their slopes and cotangents), k slots x f features (the neighbours' rows) and
// v x f (its environment and cotangents). ATen's bmm spends most of its time per matrix at these
// sizes (8 x 20 x 64 for ethanol); these loops keep a block of output columns in vector registers
// (GCC's vector extension, 32 bytes: AVX2's width): 0.57-0.95 of its time at ethanol's sizes, 0.35-0.55
// at the SPICE molecule's (float32, benchmarks/bench_slot_products.py).
constexpr int64_t kVectorBytes = 32;

template <typename T>
struct Lanes {
  typedef T vector __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t count = kVectorBytes / sizeof(T);
  static vector load(const T* p) {
    vector v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(T* p, const vector& v) { std::memcpy(p, &v, sizeof v); }
};

// Lanes 0-3 of the result: the sums of the lanes of a, b, c and d (pairwise shuffles, as AVX's hadd).
template <typename T>
typename Lanes<T>::vector four_totals(typename Lanes<T>::vector a, typename Lanes<T>::vector b, typename Lanes<T>::vector c,
                                      typename Lanes<T>::vector d);

template <>
Lanes<float>::vector four_totals<float>(Lanes<float>::vector a, Lanes<float>::vector b, Lanes<float>::vector c, Lanes<float>::vector d) {
  typedef int32_t index __attribute__((vector_size(kVectorBytes)));
  const index even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
  const index low = {0, 1, 8, 9, 4, 5, 12, 13}, high = {2, 3, 10, 11, 6, 7, 14, 15}, halves = {4, 5, 6, 7, 0, 1, 2, 3};
  const Lanes<float>::vector ab = __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);  // a0+a1, b0+b1, a2+a3, ...
  const Lanes<float>::vector cd = __builtin_shuffle(c, d, even) + __builtin_shuffle(c, d, odd);
  const Lanes<float>::vector quarters = __builtin_shuffle(ab, cd, low) + __builtin_shuffle(ab, cd, high);  // a0..a3, b0..b3, c0..c3, d0..d3, a4..a7, ...
  return quarters + __builtin_shuffle(quarters, halves);
}

template <>
Lanes<double>::vector four_totals<double>(Lanes<double>::vector a, Lanes<double>::vector b, Lanes<double>::vector c, Lanes<double>::vector d) {
  typedef int64_t index __attribute__((vector_size(kVectorBytes)));
  const index even = {0, 4, 2, 6}, odd = {1, 5, 3, 7}, low = {0, 1, 4, 5}, high = {2, 3, 6, 7};
  const Lanes<double>::vector ab = __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);  // a0+a1, b0+b1, a2+a3, b2+b3
  const Lanes<double>::vector cd = __builtin_shuffle(c, d, even) + __builtin_shuffle(c, d, odd);
  return __builtin_shuffle(ab, cd, low) + __builtin_shuffle(ab, cd, high);
}

constexpr int64_t kMaxVectorsPerBlock = 8;  // accumulators held in registers (AVX2 has 16)

// out_r (+)= sum_q c(q, r) right_q over the columns [column, column + B lanes), c(q, r) = coefficients[q * q_stride + r * r_stride].
template <typename T, int B>
void combine_block(const T* coefficients, int64_t q_stride, int64_t r_stride, const T* right, T* out, int64_t n_q, int64_t n_r, int64_t columns,
                   int64_t column, bool accumulate) {
  using L = Lanes<T>;
  for (int64_t r = 0; r < n_r; ++r) {
    typename L::vector total[B];
    for (int b = 0; b < B; ++b) total[b] = accumulate ? L::load(out + r * columns + column + b * L::count) : typename L::vector{};
    for (int64_t q = 0; q < n_q; ++q) {
      const T c = coefficients[q * q_stride + r * r_stride];
      const T* row = right + q * columns + column;
      for (int b = 0; b < B; ++b) total[b] += c * L::load(row + b * L::count);
    }
    for (int b = 0; b < B; ++b) L::store(out + r * columns + column + b * L::count, total[b]);
  }
}

// Calls block(std::integral_constant<int, B>, column) over `columns` in blocks of B <= kMaxVectorsPerBlock
// vectors, and returns the first column past them (the rest are fewer than one vector).
template <typename T, typename Block>
int64_t vector_blocks(int64_t columns, Block&& block) {
  constexpr int64_t lanes = Lanes<T>::count;
  int64_t column = 0;
  for (; column + kMaxVectorsPerBlock * lanes <= columns; column += kMaxVectorsPerBlock * lanes) block(std::integral_constant<int, kMaxVectorsPerBlock>{}, column);
  const int64_t vectors = (columns - column) / lanes;
  switch (vectors) {
    case 7: block(std::integral_constant<int, 7>{}, column); break;
    case 6: block(std::integral_constant<int, 6>{}, column); break;
    case 5: block(std::integral_constant<int, 5>{}, column); break;
    case 4: block(std::integral_constant<int, 4>{}, column); break;
    case 3: block(std::integral_constant<int, 3>{}, column); break;
    case 2: block(std::integral_constant<int, 2>{}, column); break;
    case 1: block(std::integral_constant<int, 1>{}, column); break;
    default: break;
  }
  return column + vectors * lanes;
}

// out_r (+)= sum_q c(q, r) right_q for one atom: n_r rows of `columns`, c(q, r) = coefficients[q * q_stride + r * r_stride].
template <typename T>
void combine_rows(const T* coefficients, int64_t q_stride, int64_t r_stride, const T* right, T* out, int64_t n_q, int64_t n_r, int64_t columns,
                  bool accumulate) {
  const int64_t rest = vector_blocks<T>(columns, [&](auto vectors, int64_t column) {
    combine_block<T, decltype(vectors)::value>(coefficients, q_stride, r_stride, right, out, n_q, n_r, columns, column, accumulate);
  });
  for (int64_t row = 0; row < n_r; ++row) {
    for (int64_t column = rest; column < columns; ++column) {
      T total = accumulate ? out[row * columns + column] : T(0);
      for (int64_t q = 0; q < n_q; ++q) total += coefficients[q * q_stride + row * r_stride] * right[q * columns + column];
      out[row * columns + column] = total;
    }
  }
}

// out_a (+)= op(left_a) right_a for every atom a: left (n, k, v), op(left) its transpose (v, k) or itself
// (k, v); right (n, k, f) or (n, v, f); out (n, v, f) or (n, k, f). Contiguous tensors.
template <typename T>
void slot_product_loop(Tensor out, const Tensor& left, bool transpose_left, const Tensor& right, bool accumulate) {
  const int64_t n_slots = left.size(1), n_sens = left.size(2), columns = right.size(2);
  const int64_t n_q = transpose_left ? n_slots : n_sens, n_r = transpose_left ? n_sens : n_slots;
  const int64_t q_stride = transpose_left ? n_sens : 1, r_stride = transpose_left ? 1 : n_sens;
  const T* left_p = left.data_ptr<T>();
  const T* right_p = right.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  at::parallel_for(0, left.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t atom = begin; atom < end; ++atom) {
      combine_rows(left_p + atom * n_slots * n_sens, q_stride, r_stride, right_p + atom * n_q * columns, out_p + atom * n_r * columns, n_q, n_r,
                   columns, accumulate);
    }
  });
}

// out_(slot, v) (+)= left_slot . right_v over the columns [column, column + B lanes), four v at a time.
template <typename T, int B>
void dot_block(const T* left, const T* right, T* out, int64_t n_slots, int64_t n_sens, int64_t columns, int64_t column, bool accumulate) {
  using L = Lanes<T>;
  const auto write = [&](T* o, T value) { *o = accumulate ? *o + value : value; };
  for (int64_t slot = 0; slot < n_slots; ++slot) {
    typename L::vector x[B];
    for (int b = 0; b < B; ++b) x[b] = L::load(left + slot * columns + column + b * L::count);
    T* o = out + slot * n_sens;
    int64_t v = 0;
    for (; v + 4 <= n_sens; v += 4) {
      const T* y = right + v * columns + column;
      typename L::vector partial[4];
      for (int j = 0; j < 4; ++j) partial[j] = x[0] * L::load(y + j * columns);
      for (int b = 1; b < B; ++b) {
        for (int j = 0; j < 4; ++j) partial[j] += x[b] * L::load(y + j * columns + b * L::count);
      }
      const typename L::vector totals = four_totals<T>(partial[0], partial[1], partial[2], partial[3]);
      for (int j = 0; j < 4; ++j) write(o + v + j, totals[j]);
    }
    for (; v < n_sens; ++v) {
      const T* y = right + v * columns + column;
      typename L::vector partial = x[0] * L::load(y);
      for (int b = 1; b < B; ++b) partial += x[b] * L::load(y + b * L::count);
      const typename L::vector zero{};
      write(o + v, four_totals<T>(partial, zero, zero, zero)[0]);
    }
  }
}

// out_(i, j) (+)= left_i . right_j for one atom: n_left x n_right dots of rows of `columns`.
template <typename T>
void dot_rows(const T* left, const T* right, T* out, int64_t n_left, int64_t n_right, int64_t columns, bool accumulate) {
  bool add = accumulate;  // the first block of columns writes unless accumulating; later blocks add
  const int64_t rest = vector_blocks<T>(columns, [&](auto vectors, int64_t column) {
    dot_block<T, decltype(vectors)::value>(left, right, out, n_left, n_right, columns, column, add);
    add = true;
  });
  if (rest == columns) return;
  for (int64_t i = 0; i < n_left; ++i) {
    for (int64_t j = 0; j < n_right; ++j) {
      T total = add ? out[i * n_right + j] : T(0);
      for (int64_t column = rest; column < columns; ++column) total += left[i * columns + column] * right[j * columns + column];
      out[i * n_right + j] = total;
    }
  }
}

// out_a (+)= left_a right_a^T for every atom a: left (n, k, f), right (n, v, f), out (n, k, v). Contiguous tensors.
template <typename T>
void slot_dot_loop(Tensor out, const Tensor& left, const Tensor& right, bool accumulate) {
  const int64_t n_slots = left.size(1), n_sens = right.size(1), columns = left.size(2);
  const T* left_p = left.data_ptr<T>();
  const T* right_p = right.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  at::parallel_for(0, left.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t atom = begin; atom < end; ++atom) {
      dot_rows(left_p + atom * n_slots * columns, right_p + atom * n_sens * columns, out_p + atom * n_slots * n_sens, n_slots, n_sens, columns, accumulate);
    }
  });
}

// The displacement (r_j - r_i) + shift of every neighbour slot (n k, 3), `padding` in each component of
// the slots that `mask` leaves out (Potential.neighbour_vectors_angstrom), and its length (n k,).
template <typename T>
std::pair<Tensor, Tensor> displacements(const Tensor& positions, const Tensor& flat_index, const Tensor& shift, const Tensor& mask, double padding) {
  const int64_t slots = flat_index.numel(), n_slots = mask.size(1);
  Tensor vector = torch::empty({slots, 3}, positions.options()), distance = torch::empty({slots}, positions.options());
  const T* r = positions.data_ptr<T>();
  const T* offset = shift.data_ptr<T>();
  const bool* inside = mask.data_ptr<bool>();
  const int64_t* neighbour = flat_index.data_ptr<int64_t>();
  T* v = vector.data_ptr<T>();
  T* d = distance.data_ptr<T>();
  for (int64_t slot = 0; slot < slots; ++slot) {
    const int64_t i = slot / n_slots, j = neighbour[slot];
    T squared = 0;
    for (int64_t c = 0; c < 3; ++c) {
      const T x = inside[slot] ? (r[3 * j + c] - r[3 * i + c]) + offset[3 * slot + c] : T(padding);
      v[3 * slot + c] = x;
      squared += x * x;
    }
    d[slot] = std::sqrt(squared);
  }
  return {vector, distance};
}

// Forces (n, 3) from dE/d(distance) of every slot: with G = dE/d(distance) v / |v|, each slot adds G
// to its atom and takes it from its neighbour (Potential.hipnn_forward).
template <typename T>
Tensor slot_forces(const Tensor& distance_gradient, const Tensor& vector, const Tensor& distance, const Tensor& flat_index) {
  Tensor forces = torch::zeros({distance.size(0), 3}, vector.options());
  const T *g = distance_gradient.data_ptr<T>(), *v = vector.data_ptr<T>(), *d = distance.data_ptr<T>();
  const int64_t* neighbour = flat_index.data_ptr<int64_t>();
  const int64_t slots = flat_index.numel(), n_slots = distance.size(1);
  T* f = forces.data_ptr<T>();
  for (int64_t slot = 0; slot < slots; ++slot) {
    const int64_t i = slot / n_slots, j = neighbour[slot];
    const T scale = g[slot] / d[slot];
    for (int64_t c = 0; c < 3; ++c) {
      const T component = scale * v[3 * slot + c];
      f[3 * i + c] += component;
      f[3 * j + c] -= component;
    }
  }
  return forces;
}

// d(loss)/d(dE/d(distance)) (n, k) from d(loss)/d(forces) (n, 3): the adjoint of slot_forces.
template <typename T>
Tensor slot_forces_adjoint(const Tensor& force_cotangent, const Tensor& vector, const Tensor& distance, const Tensor& flat_index) {
  const int64_t slots = flat_index.numel(), n_slots = distance.size(1);
  Tensor out = torch::empty_like(distance);
  const T *fc = force_cotangent.data_ptr<T>(), *v = vector.data_ptr<T>(), *d = distance.data_ptr<T>();
  const int64_t* neighbour = flat_index.data_ptr<int64_t>();
  T* o = out.data_ptr<T>();
  for (int64_t slot = 0; slot < slots; ++slot) {
    const int64_t i = slot / n_slots, j = neighbour[slot];
    T total = 0;
    for (int64_t c = 0; c < 3; ++c) total += v[3 * slot + c] * (fc[3 * i + c] - fc[3 * j + c]);
    o[slot] = total / d[slot];
  }
  return out;
}

// Each element-wise kernel for the tensors' dtype (float32 or float64).
#define METAMLIP_DISPATCH(tensor, function, ...) \
  ((tensor).scalar_type() == torch::kFloat ? function<float>(__VA_ARGS__) : function<double>(__VA_ARGS__))

// Rows narrower than one vector (the first interaction's one-hot input: f = the number of elements)
// leave the vector blocks idle. The environment and the messages run along the sensitivities instead,
// with the atom's narrow matrix transposed to (f, v) in a scratch buffer: 2.1-2.7x faster than ATen's
// bmm there; the dots stay with bmm, faster than these loops (benchmarks/bench_slot_products.py, BENCHMARKS.md).
bool narrow(const Tensor& rows) { return rows.size(-1) * rows.element_size() < kVectorBytes; }

// slot_product_loop for narrow rows: left (n, k, v); right the rows (n, k, f) for the environment
// (transpose_left: out (n, v, f)), else (n, v, f) for the messages (out (n, k, f)).
template <typename T>
void narrow_product_loop(Tensor out, const Tensor& left, bool transpose_left, const Tensor& right, bool accumulate) {
  const int64_t n_slots = left.size(1), n_sens = left.size(2), columns = right.size(2);
  const T* left_p = left.data_ptr<T>();
  const T* right_p = right.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  at::parallel_for(0, left.size(0), 16, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(columns * n_sens);  // (f, v)
    T* transposed = scratch.data();
    for (int64_t atom = begin; atom < end; ++atom) {
      const T* s = left_p + atom * n_slots * n_sens;
      const T* r = right_p + atom * right.size(1) * columns;
      T* o = out_p + atom * out.size(1) * columns;
      if (transpose_left) {  // (x^T s) (f, v) here, then (+)= its transpose into o
        combine_rows(r, columns, int64_t{1}, s, transposed, n_slots, columns, n_sens, false);
        for (int64_t v = 0; v < n_sens; ++v) {
          for (int64_t c = 0; c < columns; ++c) o[v * columns + c] = (accumulate ? o[v * columns + c] : T(0)) + transposed[c * n_sens + v];
        }
      } else {  // e^T (f, v) here, then o[k, c] (+)= s_k . e^T_c
        for (int64_t v = 0; v < n_sens; ++v) {
          for (int64_t c = 0; c < columns; ++c) transposed[c * n_sens + v] = r[v * columns + c];
        }
        dot_rows(s, transposed, o, n_slots, columns, n_sens, accumulate);
      }
    }
  });
}

// op(left_a) right_a for every atom a (slot_product_loop), written into `out` or, with `accumulate`, added to it.
void slot_product_into(Tensor out, const Tensor& left, bool transpose_left, const Tensor& right, bool accumulate) {
  TORCH_CHECK(out.is_contiguous(), "slot products write into contiguous tensors");
  if (narrow(right)) return METAMLIP_DISPATCH(right, narrow_product_loop, out, left.contiguous(), transpose_left, right.contiguous(), accumulate);
  METAMLIP_DISPATCH(right, slot_product_loop, out, left.contiguous(), transpose_left, right.contiguous(), accumulate);
}

Tensor slot_product(const Tensor& left, bool transpose_left, const Tensor& right) {
  Tensor out = torch::empty({left.size(0), left.size(transpose_left ? 2 : 1), right.size(2)}, right.options());
  slot_product_into(out, left, transpose_left, right, false);
  return out;
}

// left_a right_a^T for every atom a (slot_dot_loop), written into `out` or, with `accumulate`, added to it.
void slot_dots_into(Tensor out, const Tensor& left, const Tensor& right, bool accumulate) {
  TORCH_CHECK(out.is_contiguous(), "slot products write into contiguous tensors");
  if (!narrow(right)) return METAMLIP_DISPATCH(right, slot_dot_loop, out, left.contiguous(), right.contiguous(), accumulate);
  if (accumulate) {  // ATen's bmm is faster than the loops on narrow rows here
    out.baddbmm_(left, right.transpose(1, 2));
  } else {
    torch::bmm_out(out, left, right.transpose(1, 2));
  }
}

Tensor slot_dots(const Tensor& left, const Tensor& right) {
  Tensor out = torch::empty({left.size(0), left.size(1), right.size(1)}, right.options());
  slot_dots_into(out, left, right, false);
  return out;
}

// rows @ matrix, once when every row is the same (the head's weights broadcast over atoms).
Tensor row_product(const Tensor& rows, const Tensor& matrix) {
  if (rows.size(0) > 1 && rows.stride(0) == 0) return rows.narrow(0, 0, 1).mm(matrix).expand({rows.size(0), -1});
  return rows.mm(matrix);
}

// Ranges of atoms with about `chunk_bytes` of per-slot data each (slot_chunks of hipnn_forces.py).
Chunks slot_chunks(int64_t n_atoms, int64_t slot_elements_per_atom, int64_t element_size, int64_t chunk_bytes) {
  const int64_t bytes_per_atom = std::max<int64_t>(1, slot_elements_per_atom * element_size);
  if (n_atoms * bytes_per_atom <= 4 * chunk_bytes) return {{0, n_atoms}};
  const int64_t step = std::max<int64_t>(1, chunk_bytes / bytes_per_atom);
  Chunks chunks;
  for (int64_t first = 0; first < n_atoms; first += step) chunks.emplace_back(first, std::min(first + step, n_atoms));
  return chunks;
}

// The weights of one interaction block.
struct Block {
  Tensor mu, sigma, matrix, self_weight, self_bias, res_weight, res_bias, adjust_weight;  // adjust: empty when f_in == f_out
  std::vector<std::vector<Tensor>> atom_layers;                                             // W1, b1, W2, b2 each
  double cutoff_angstrom = 0;
  bool adjusted() const { return adjust_weight.numel() > 0; }
};

// An interaction layer (with its residual) in the forward pass, then the force pass (InteractionTrace).
struct InteractionRecord {
  Tensor features;                                   // (n, f_in) input x
  Chunks chunks;
  std::vector<Tensor> values, sensitivity_slopes;    // per chunk (atoms, k, v): s and ds/dr
  std::vector<Tensor> rows;                          // per chunk (atoms, k, f_in): x_j of each slot's neighbour
  Tensor environment;                                // (n, v f_in) sum over slots of s x_j
  Tensor activation, activation_slope;               // (n, f_out) softplus(h), sigmoid(h)
  Tensor output_gradient, middle_gradient, pre_activation_gradient;  // (n, f_out) of the force pass
  Tensor environment_gradient;                       // (n, v f_in) dE/d(environment)
  std::vector<Tensor> sensitivity_gradient;          // per chunk (atoms, k, v) dE/ds
  Tensor matrix_cotangent;                           // (f_out, v f_in), from the force adjoint
};

// A residual atom layer in the forward pass, then the force pass (AtomLayerTrace).
struct LayerRecord {
  Tensor features, activation, activation_slope, output_gradient, middle_gradient, pre_activation_gradient;
};

struct BlockRecord {
  InteractionRecord interaction;
  std::vector<LayerRecord> layers;
  Tensor output;  // (n, f) features of the block
};

// Everything one batch's backward needs (NetworkTrace); handed to Python as an opaque object.
struct Trace {
  std::vector<Block> blocks;
  std::vector<Tensor> read_out_weights, read_out_biases;  // (1, f_b) for the input and each block; (1,) each block
  Tensor input_features, flat_index;                      // (n, f_0), (n k,)
  Tensor vector, distance;                                // (n, k, 3), (n, k) when built from positions (forward_forces)
  int64_t n_atoms = 0, n_slots = 0, chunk_bytes = 0;
  std::map<double, Geometry> geometries;                  // by cutoff
  std::vector<BlockRecord> records;
};

// Gradients by position in HipnnWeights.tensors(): read-out weights, read-out biases, then per block
// mu, sigma, int_weights, self W, self b, res W, res b, [adjust W], and W1, b1, W2, b2 per atom layer.
struct Gradients {
  std::vector<Tensor> by_position;

  void add(size_t position, const Tensor& gradient) {
    Tensor& slot = by_position[position];
    slot = slot.defined() ? slot.add_(gradient) : gradient;
  }
  // adds rows^T @ right (both (n, .)); rows the same for every atom when broadcast (the head's weights)
  void add_product(size_t position, const Tensor& rows, const Tensor& right) {
    Tensor& slot = by_position[position];
    if (rows.size(0) > 1 && rows.stride(0) == 0) {
      add(position, torch::outer(rows[0], right.sum(0)));
    } else if (slot.defined()) {
      slot.addmm_(rows.t(), right);
    } else {
      slot = rows.t().mm(right);
    }
  }
};

// Position of block b's first tensor (mu) in HipnnWeights.tensors().
size_t block_position(const Trace& t, size_t b) {
  size_t position = 2 * t.blocks.size() + 1;
  for (size_t i = 0; i < b; ++i) position += 7 + t.blocks[i].adjusted() + 4 * t.blocks[i].atom_layers.size();
  return position;
}

enum InteractionSlot { kMu = 0, kSigma, kIntWeights, kSelfWeight, kSelfBias, kResWeight, kResBias, kAdjustWeight };

size_t layer_position(const Trace& t, size_t b, size_t l) { return block_position(t, b) + 7 + t.blocks[b].adjusted() + 4 * l; }

Tensor neighbour_rows(const Tensor& rows, const Tensor& index, int64_t n_atoms, int64_t n_slots) {
  return rows.index_select(0, index).view({n_atoms, n_slots, rows.size(1)});
}

// out[index[i]] += slot_rows[i] for every slot i (the adjoint of neighbour_rows): one pass in slot order,
// where ATen's index_add_ first sorts the index (2.4-3.4x the time at ethanol's sizes, BENCHMARKS.md).
template <typename T>
void add_rows(Tensor& out, const Tensor& index, const Tensor& slot_rows) {
  const int64_t columns = out.size(1), slots = index.numel();
  TORCH_CHECK(out.is_contiguous() && slot_rows.is_contiguous() && slot_rows.numel() == slots * columns, "add_rows: contiguous rows of one width");
  const int64_t* neighbour = index.data_ptr<int64_t>();
  const T* from = slot_rows.data_ptr<T>();
  T* to = out.data_ptr<T>();
  for (int64_t slot = 0; slot < slots; ++slot) {
    T* row = to + neighbour[slot] * columns;
    const T* add = from + slot * columns;
#pragma omp simd
    for (int64_t c = 0; c < columns; ++c) row[c] += add[c];
  }
}

// Forward pass, then the force pass: (n,) atom energies and (n, k) dE/d(distance), the trace filled in.
std::vector<Tensor> forward_and_force(Trace& t, const Tensor& distance) {
  const int64_t n = t.n_atoms, k = t.n_slots;
  Tensor features = t.input_features;
  Tensor energies = torch::mv(features, t.read_out_weights[0][0]);
  t.records.resize(t.blocks.size());
  for (size_t b = 0; b < t.blocks.size(); ++b) {
    const Block& w = t.blocks[b];
    auto found = t.geometries.find(w.cutoff_angstrom);
    if (found == t.geometries.end()) {
      found = t.geometries.emplace(w.cutoff_angstrom, METAMLIP_DISPATCH(distance, geometry, distance, w.cutoff_angstrom)).first;
    }
    const int64_t n_in = features.size(1), n_sens = w.mu.size(1);
    InteractionRecord& r = t.records[b].interaction;
    r.features = features;
    r.chunks = slot_chunks(n, k * (n_in + 4 * n_sens), features.element_size(), t.chunk_bytes);
    r.environment = torch::empty({n, n_sens * n_in}, features.options());
    Tensor pre_activation = torch::addmm(w.self_bias, features, w.self_weight.t());
    for (const auto& [first, last] : r.chunks) {
      auto [values, slopes] = METAMLIP_DISPATCH(distance, sensitivities, found->second, w.mu, w.sigma, first, last);
      const Tensor& rows = r.rows.emplace_back(neighbour_rows(features, t.flat_index.narrow(0, first * k, (last - first) * k), last - first, k));
      Tensor part = r.environment.narrow(0, first, last - first);
      Tensor part_by_sensitivity = part.view({last - first, n_sens, n_in});
      slot_product_into(part_by_sensitivity, values, true, rows, false);
      pre_activation.narrow(0, first, last - first).addmm_(part, w.matrix.t());
      r.values.push_back(values);
      r.sensitivity_slopes.push_back(slopes);
    }
    std::tie(r.activation, r.activation_slope) = METAMLIP_DISPATCH(features, activation, pre_activation);
    // the residual sum in one pass, then the product added into it (not bias copy, product, sum: one pass fewer)
    const Tensor shortcut = w.adjusted() ? features.mm(w.adjust_weight.t()).add_(w.res_bias) : features + w.res_bias;
    features = shortcut.addmm_(r.activation, w.res_weight.t());
    for (const auto& layer : w.atom_layers) {
      LayerRecord& l = t.records[b].layers.emplace_back();
      l.features = features;
      std::tie(l.activation, l.activation_slope) = METAMLIP_DISPATCH(features, activation, torch::addmm(layer[1], features, layer[0].t()));
      features = (features + layer[3]).addmm_(l.activation, layer[2].t());
    }
    t.records[b].output = features;
    energies = torch::addmv(energies, features, t.read_out_weights[b + 1][0]).add_(t.read_out_biases[b]);
  }

  Tensor distance_gradient = torch::zeros({n, k}, features.options());
  Tensor gradient = t.read_out_weights.back().expand({n, -1});  // dE/d(features of the last block)
  for (int64_t b = static_cast<int64_t>(t.blocks.size()) - 1; b >= 0; --b) {
    const Block& w = t.blocks[b];
    BlockRecord& record = t.records[b];
    for (int64_t i = static_cast<int64_t>(w.atom_layers.size()) - 1; i >= 0; --i) {
      LayerRecord& l = record.layers[i];
      l.output_gradient = gradient;
      l.middle_gradient = row_product(gradient, w.atom_layers[i][2]);
      l.pre_activation_gradient = l.middle_gradient.mul(l.activation_slope);
      gradient = torch::addmm(gradient, l.pre_activation_gradient, w.atom_layers[i][0]);
    }
    InteractionRecord& r = record.interaction;
    const int64_t n_in = r.features.size(1), n_sens = w.mu.size(1);
    r.output_gradient = gradient;
    r.middle_gradient = row_product(gradient, w.res_weight);
    r.pre_activation_gradient = r.middle_gradient.mul(r.activation_slope);
    Tensor input_gradient;
    if (b > 0) input_gradient = torch::addmm(w.adjusted() ? gradient.mm(w.adjust_weight) : gradient, r.pre_activation_gradient, w.self_weight);
    r.environment_gradient = torch::empty({n, n_sens * n_in}, r.features.options());
    for (size_t c = 0; c < r.chunks.size(); ++c) {
      const auto [first, last] = r.chunks[c];
      const Tensor index = t.flat_index.narrow(0, first * k, (last - first) * k);
      Tensor part = r.environment_gradient.narrow(0, first, last - first);
      torch::mm_out(part, r.pre_activation_gradient.narrow(0, first, last - first), w.matrix);
      const Tensor environment_gradient = part.view({last - first, n_sens, n_in});
      r.sensitivity_gradient.push_back(slot_dots(r.rows[c], environment_gradient));
      METAMLIP_DISPATCH(distance, add_slot_sums, r.sensitivity_gradient.back(), r.sensitivity_slopes[c], distance_gradient.narrow(0, first, last - first));
      if (b > 0) METAMLIP_DISPATCH(input_gradient, add_rows, input_gradient, index, slot_product(r.values[c], false, environment_gradient));  // s dE/d(environment) to each neighbour
    }
    if (b > 0) gradient = input_gradient.add_(t.read_out_weights[b]);
  }
  return {energies, distance_gradient};
}

// Per chunk: d(loss)/ds (or undefined), d(loss)/d(ds/dr) and d(loss)/d(dE/ds) that the force adjoint leaves.
struct Carried {
  Tensor values_cotangent, slopes_cotangent, sensitivity_gradient_cotangent;
};

// Adjoint of the interaction's force pass (interaction_force_adjoint): d(loss)/d(output gradient) and
// d(loss)/d(sigmoid(h)), with what it leaves per chunk in `carried`.
std::pair<Tensor, Tensor> interaction_force_adjoint(Trace& t, size_t b, const Tensor& input_gradient_cotangent, const Tensor& slot_cotangent,
                                                    Gradients& gradients, std::vector<Carried>& carried) {
  const Block& w = t.blocks[b];
  InteractionRecord& r = t.records[b].interaction;
  const size_t at = block_position(t, b);
  const int64_t k = t.n_slots, n_in = r.features.size(1), n_sens = w.mu.size(1);
  Tensor pre_activation_cotangent, output_cotangent;
  if (!input_gradient_cotangent.defined()) {
    pre_activation_cotangent = torch::zeros_like(r.pre_activation_gradient);
  } else {
    pre_activation_cotangent = input_gradient_cotangent.mm(w.self_weight.t());
    if (w.adjusted()) {
      output_cotangent = input_gradient_cotangent.mm(w.adjust_weight.t());
      gradients.add_product(at + kAdjustWeight, r.output_gradient, input_gradient_cotangent);
    } else {
      output_cotangent = input_gradient_cotangent;
    }
    gradients.add_product(at + kSelfWeight, r.pre_activation_gradient, input_gradient_cotangent);
  }
  r.matrix_cotangent = torch::zeros_like(w.matrix);
  for (size_t c = 0; c < r.chunks.size(); ++c) {
    const auto [first, last] = r.chunks[c];
    const Tensor index = t.flat_index.narrow(0, first * k, (last - first) * k);
    const Tensor slot_part = slot_cotangent.narrow(0, first, last - first).unsqueeze(-1);
    Carried& left = carried.emplace_back();
    left.sensitivity_gradient_cotangent = slot_part * r.sensitivity_slopes[c];
    left.slopes_cotangent = slot_part * r.sensitivity_gradient[c];
    const Tensor environment_gradient = r.environment_gradient.narrow(0, first, last - first).view({last - first, n_sens, n_in});
    Tensor environment_gradient_cotangent = slot_product(left.sensitivity_gradient_cotangent, true, r.rows[c]);
    if (input_gradient_cotangent.defined()) {  // dE/dx was scattered to the neighbours: its cotangent is gathered
      const Tensor spread = neighbour_rows(input_gradient_cotangent, index, last - first, k);
      left.values_cotangent = slot_dots(spread, environment_gradient);
      slot_product_into(environment_gradient_cotangent, r.values[c], true, spread, true);
    }
    const Tensor flat_cotangent = environment_gradient_cotangent.view({last - first, n_sens * n_in});
    pre_activation_cotangent.narrow(0, first, last - first).addmm_(flat_cotangent, w.matrix.t());
    r.matrix_cotangent.addmm_(r.pre_activation_gradient.narrow(0, first, last - first).t(), flat_cotangent);
  }
  const Tensor middle_cotangent = pre_activation_cotangent * r.activation_slope;
  const Tensor slope_cotangent = pre_activation_cotangent.mul_(r.middle_gradient);
  gradients.add_product(at + kResWeight, r.output_gradient, middle_cotangent);
  Tensor product = middle_cotangent.mm(w.res_weight.t());
  return {output_cotangent.defined() ? product.add_(output_cotangent) : product, slope_cotangent};
}

// Adjoint of G -> G + ((G W2) sigmoid(h)) W1 (atom_layer_force_adjoint): d(loss)/dG and d(loss)/d(sigmoid(h)).
std::pair<Tensor, Tensor> atom_layer_force_adjoint(Trace& t, size_t b, size_t i, const Tensor& input_gradient_cotangent, Gradients& gradients) {
  const auto& layer = t.blocks[b].atom_layers[i];
  const LayerRecord& l = t.records[b].layers[i];
  const size_t at = layer_position(t, b, i);
  Tensor pre_activation_cotangent = input_gradient_cotangent.mm(layer[0].t());
  gradients.add_product(at, l.pre_activation_gradient, input_gradient_cotangent);
  const Tensor middle_cotangent = pre_activation_cotangent * l.activation_slope;
  const Tensor slope_cotangent = pre_activation_cotangent.mul_(l.middle_gradient);
  gradients.add_product(at + 2, l.output_gradient, middle_cotangent);
  return {torch::addmm(input_gradient_cotangent, middle_cotangent, layer[2].t()), slope_cotangent};
}

// Adjoint of x -> x + W2 softplus(W1 x + b1) + b2 with the force pass's d(loss)/d(sigmoid(h)): d(loss)/dx.
Tensor atom_layer_adjoint(Trace& t, size_t b, size_t i, const Tensor& output_cotangent, const Tensor& slope_cotangent, Gradients& gradients) {
  const auto& layer = t.blocks[b].atom_layers[i];
  const LayerRecord& l = t.records[b].layers[i];
  const size_t at = layer_position(t, b, i);
  gradients.add_product(at + 2, output_cotangent, l.activation);
  gradients.add(at + 3, output_cotangent.sum(0));
  const Tensor pre_activation_cotangent =
      METAMLIP_DISPATCH(output_cotangent, activation_adjoint, output_cotangent.mm(layer[2]), l.activation_slope, slope_cotangent);
  gradients.add_product(at, pre_activation_cotangent, l.features);
  gradients.add(at + 1, pre_activation_cotangent.sum(0));
  return torch::addmm(output_cotangent, pre_activation_cotangent, layer[0]);
}

// Adjoint of the interaction layer and its residual (interaction_adjoint): d(loss)/dx when asked.
Tensor interaction_adjoint(Trace& t, size_t b, const Tensor& output_cotangent, const Tensor& slope_cotangent, std::vector<Carried>& carried,
                           bool need_features, Gradients& gradients) {
  const Block& w = t.blocks[b];
  InteractionRecord& r = t.records[b].interaction;
  const size_t at = block_position(t, b);
  const int64_t k = t.n_slots, n_in = r.features.size(1), n_sens = w.mu.size(1), n_out = w.matrix.size(0);
  gradients.add_product(at + kResWeight, output_cotangent, r.activation);
  gradients.add(at + kResBias, output_cotangent.sum(0));
  const Tensor pre_activation_cotangent =
      METAMLIP_DISPATCH(output_cotangent, activation_adjoint, output_cotangent.mm(w.res_weight), r.activation_slope, slope_cotangent);
  gradients.add_product(at + kSelfWeight, pre_activation_cotangent, r.features);
  gradients.add(at + kSelfBias, pre_activation_cotangent.sum(0));
  const Tensor matrix_cotangent = r.matrix_cotangent.addmm_(pre_activation_cotangent.t(), r.environment);
  gradients.add(at + kIntWeights, matrix_cotangent.view({n_out, n_sens, n_in}).transpose(0, 1));
  if (w.adjusted()) gradients.add_product(at + kAdjustWeight, output_cotangent, r.features);
  Tensor input_cotangent;
  if (need_features) {
    input_cotangent = w.adjusted() ? output_cotangent.mm(w.adjust_weight).addmm_(pre_activation_cotangent, w.self_weight)
                                   : torch::addmm(output_cotangent, pre_activation_cotangent, w.self_weight);
  }
  std::vector<double> mu_sum(n_sens, 0.0), sigma_sum(n_sens, 0.0);
  for (size_t c = 0; c < r.chunks.size(); ++c) {
    const auto [first, last] = r.chunks[c];
    const Tensor index = t.flat_index.narrow(0, first * k, (last - first) * k);
    const Tensor environment_cotangent = pre_activation_cotangent.narrow(0, first, last - first).mm(w.matrix).view({last - first, n_sens, n_in});
    const Tensor& rows = r.rows[c];
    Tensor& values_cotangent = carried[c].values_cotangent;
    if (values_cotangent.defined()) {
      slot_dots_into(values_cotangent, rows, environment_cotangent, true);
    } else {
      values_cotangent = slot_dots(rows, environment_cotangent);
    }
    METAMLIP_DISPATCH(r.features, add_sensitivity_adjoint, t.geometries.at(w.cutoff_angstrom), w.mu, w.sigma, first, last, r.values[c],
                                                           r.sensitivity_slopes[c], values_cotangent, carried[c].slopes_cotangent, mu_sum, sigma_sum);
    if (input_cotangent.defined()) {  // both products reach the neighbours' features: scattered back to them
      const Tensor environment_gradient = r.environment_gradient.narrow(0, first, last - first).view({last - first, n_sens, n_in});
      const Tensor message = slot_product(r.values[c], false, environment_cotangent);
      slot_product_into(message, carried[c].sensitivity_gradient_cotangent, false, environment_gradient, true);
      METAMLIP_DISPATCH(input_cotangent, add_rows, input_cotangent, index, message);
    }
  }
  const auto as_tensor = [&](const std::vector<double>& sums) { return torch::tensor(sums, torch::kDouble).to(w.mu.scalar_type()).view({1, n_sens}); };
  gradients.add(at + kSigma, as_tensor(sigma_sum).div_(w.sigma));
  gradients.add(at + kMu, as_tensor(mu_sum).mul_(w.sigma / w.mu.square()));
  return input_cotangent;
}

// The weight gradients (in HipnnWeights.tensors() order) and, when asked, d(loss)/d(input features)
// of a loss with d(loss)/d(atom energies) (n,) and d(loss)/d(distance gradient) (n, k) (backward_pass).
std::pair<std::vector<Tensor>, Tensor> backward(Trace& t, const Tensor& energy_cotangent, const Tensor& distance_cotangent, bool input_cotangent) {
  torch::NoGradGuard no_grad;
  const size_t n_blocks = t.blocks.size();
  Gradients gradients{std::vector<Tensor>(block_position(t, n_blocks))};
  std::vector<std::vector<Carried>> carried(n_blocks);
  std::vector<std::vector<Tensor>> slope_cotangents(n_blocks);
  Tensor upward;  // d(loss)/d(dE/d(input features of the block))
  for (size_t b = 0; b < n_blocks; ++b) {
    auto [cotangent, slope_cotangent] = interaction_force_adjoint(t, b, upward, distance_cotangent, gradients, carried[b]);
    slope_cotangents[b].push_back(slope_cotangent);
    for (size_t i = 0; i < t.blocks[b].atom_layers.size(); ++i) {
      std::tie(cotangent, slope_cotangent) = atom_layer_force_adjoint(t, b, i, cotangent, gradients);
      slope_cotangents[b].push_back(slope_cotangent);
    }
    gradients.add(b + 1, cotangent.sum(0).view({1, -1}));
    upward = cotangent;
  }
  Tensor downward;  // d(loss)/d(features of the block)
  for (int64_t b = static_cast<int64_t>(n_blocks) - 1; b >= 0; --b) {
    const Tensor& read_out = t.read_out_weights[b + 1];
    gradients.add(b + 1, torch::mv(t.records[b].output.t(), energy_cotangent).view({1, -1}));
    gradients.add(n_blocks + 1 + b, energy_cotangent.sum().view({1}));
    const Tensor energy_term = torch::outer(energy_cotangent, read_out[0]);
    downward = downward.defined() ? downward.add_(energy_term) : energy_term;
    for (int64_t i = static_cast<int64_t>(t.blocks[b].atom_layers.size()) - 1; i >= 0; --i) {
      downward = atom_layer_adjoint(t, b, i, downward, slope_cotangents[b][i + 1], gradients);
    }
    downward = interaction_adjoint(t, b, downward, slope_cotangents[b][0], carried[b], b > 0 || input_cotangent, gradients);
  }
  gradients.add(0, torch::mv(t.input_features.t(), energy_cotangent).view({1, -1}));
  if (!input_cotangent) return {gradients.by_position, Tensor()};
  return {gradients.by_position, downward.addr_(energy_cotangent, t.read_out_weights[0][0])};
}

// interactions: per block mu, sigma, matrix, self W, self b, res W, res b, adjust W (empty when none);
// atom_layers: per block, per layer W1, b1, W2, b2.
std::shared_ptr<Trace> make_trace(const std::vector<Tensor>& interactions, const std::vector<Tensor>& atom_layers, int64_t layers_per_block,
                                  const std::vector<double>& cutoffs, const std::vector<Tensor>& read_out_weights,
                                  const std::vector<Tensor>& read_out_biases, const Tensor& input_features, const Tensor& neighbour_index,
                                  const Tensor& distance, int64_t chunk_bytes) {
  TORCH_CHECK(interactions.size() == 8 * cutoffs.size(), "8 interaction tensors per block");
  TORCH_CHECK(atom_layers.size() == static_cast<size_t>(4 * layers_per_block) * cutoffs.size(), "4 tensors per atom layer");
  TORCH_CHECK(input_features.scalar_type() == torch::kFloat || input_features.scalar_type() == torch::kDouble,
              "HIP-NN native kernels take float32 or float64, not ", input_features.scalar_type());
  TORCH_CHECK(distance.scalar_type() == input_features.scalar_type(), "distances and features differ in dtype");
  auto t = std::make_shared<Trace>();
  for (size_t b = 0; b < cutoffs.size(); ++b) {
    const Tensor* w = &interactions[8 * b];
    Block& block = t->blocks.emplace_back(Block{w[0].contiguous(), w[1].contiguous(), w[2], w[3], w[4], w[5], w[6], w[7], {}, cutoffs[b]});
    for (int64_t l = 0; l < layers_per_block; ++l) {
      const Tensor* a = &atom_layers[4 * (b * layers_per_block + l)];
      block.atom_layers.push_back({a[0], a[1], a[2], a[3]});
    }
  }
  t->read_out_weights = read_out_weights;
  t->read_out_biases = read_out_biases;
  t->input_features = input_features.contiguous();
  t->flat_index = neighbour_index.reshape(-1).contiguous();
  t->n_atoms = neighbour_index.size(0);
  t->n_slots = neighbour_index.size(1);
  t->chunk_bytes = chunk_bytes;
  return t;
}

// `backward` as Python takes it: the weight gradients and d(loss)/d(input features) or None.
pybind11::tuple backward_result(Trace& t, const Tensor& energy_cotangent, const Tensor& distance_cotangent, bool input_cotangent) {
  auto [gradients, input] = backward(t, energy_cotangent.contiguous(), distance_cotangent.contiguous(), input_cotangent);
  return pybind11::make_tuple(gradients, input.defined() ? pybind11::cast(input) : pybind11::none());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  pybind11::class_<Trace, std::shared_ptr<Trace>>(module, "Trace", "The forward and force passes of one batch, kept for `backward`");
  module.def(
      "forward",
      [](const std::vector<Tensor>& interactions, const std::vector<Tensor>& atom_layers, int64_t layers_per_block, const std::vector<double>& cutoffs,
         const std::vector<Tensor>& read_out_weights, const std::vector<Tensor>& read_out_biases, const Tensor& input_features,
         const Tensor& neighbour_index, const Tensor& distance, int64_t chunk_bytes) {
        torch::NoGradGuard no_grad;
        auto trace = make_trace(interactions, atom_layers, layers_per_block, cutoffs, read_out_weights, read_out_biases, input_features,
                                neighbour_index, distance, chunk_bytes);
        const auto outputs = forward_and_force(*trace, distance.contiguous());
        return std::make_tuple(outputs[0], outputs[1], trace);
      },
      "HIP-NN atom energies (n,), dE/d(distance) (n, k) of every neighbour slot, and the trace for `backward`");
  module.def(
      "backward",
      [](const std::shared_ptr<Trace>& trace, const Tensor& energy_cotangent, const Tensor& distance_cotangent, bool input_cotangent) {
        return backward_result(*trace, energy_cotangent, distance_cotangent, input_cotangent);
      },
      "Weight gradients (HipnnWeights.tensors() order) and d(loss)/d(input features) (or None) of a loss on the energies and distance gradient");
  module.def("slot_product_into", &slot_product_into, "out (+)= op(left_a) right_a per atom, op the transpose or not (for tests and benchmarks)");
  module.def("slot_dots_into", &slot_dots_into, "out (+)= left_a right_a^T per atom (for tests and benchmarks)");
  module.def(
      "activation", [](const Tensor& pre_activation) { return METAMLIP_DISPATCH(pre_activation, activation, pre_activation.contiguous()); },
      "softplus(h) and sigmoid(h) (for tests)");
  module.def(
      "forward_forces",
      [](const std::vector<Tensor>& interactions, const std::vector<Tensor>& atom_layers, int64_t layers_per_block, const std::vector<double>& cutoffs,
         const std::vector<Tensor>& read_out_weights, const std::vector<Tensor>& read_out_biases, const Tensor& input_features,
         const Tensor& neighbour_index, const Tensor& positions, const Tensor& shift, const Tensor& mask, double padding, int64_t chunk_bytes) {
        torch::NoGradGuard no_grad;
        TORCH_CHECK(positions.scalar_type() == input_features.scalar_type() && shift.scalar_type() == input_features.scalar_type(),
                    "positions, shifts and features differ in dtype");
        const Tensor flat_index = neighbour_index.reshape(-1).contiguous();
        auto [vector, distance] = METAMLIP_DISPATCH(positions, displacements, positions.contiguous(), flat_index, shift.contiguous(), mask.contiguous(), padding);
        distance = distance.view(neighbour_index.sizes());
        auto trace = make_trace(interactions, atom_layers, layers_per_block, cutoffs, read_out_weights, read_out_biases, input_features,
                                neighbour_index, distance, chunk_bytes);
        const auto outputs = forward_and_force(*trace, distance);
        trace->vector = vector;
        trace->distance = distance;
        const Tensor forces = METAMLIP_DISPATCH(positions, slot_forces, outputs[1], vector, distance, flat_index);
        return std::make_tuple(outputs[0], forces, trace);
      },
      "HIP-NN atom energies (n,) and forces (n, 3) from positions, neighbour slots (index, shift, mask) and the padding vector's "
      "component, and the trace for `backward_forces`");
  module.def(
      "backward_forces",
      [](const std::shared_ptr<Trace>& trace, const Tensor& energy_cotangent, const Tensor& force_cotangent, bool input_cotangent) {
        const Tensor distance_cotangent =
            METAMLIP_DISPATCH(force_cotangent, slot_forces_adjoint, force_cotangent.contiguous(), trace->vector, trace->distance, trace->flat_index);
        return backward_result(*trace, energy_cotangent, distance_cotangent, input_cotangent);
      },
      "Weight gradients (HipnnWeights.tensors() order) and d(loss)/d(input features) (or None) of a loss on the energies and forces");
}
