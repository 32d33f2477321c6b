// HIP-NN inference in one C++ call: atom energies and dE/d(distance) of every neighbour slot.
//
// The same computation as `evaluate` in hipnn_forces.py (forward pass, then the force pass from the
// energy head down), for inference only: no trace is kept for a weight gradient. Matrix products
// stay ATen's (MKL); what this adds is no Python between the ~150 operations of a call, and fused
// loops for the element-wise work: the cutoff terms, the sensitivities with their distance slopes,
// softplus and sigmoid from one exponential, and the slot sum of the sensitivity gradient.
// Built on first use by metamlip/model/hipnn_native.py (torch.utils.cpp_extension).

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <utility>
#include <vector>

using torch::Tensor;

// glibc's vector variants (libmvec) of exp and log, so that the element-wise loops below vectorise
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
    const T e = minus_abs < exponent_floor ? T(0) : std::exp(floored), one_plus_e = T(1) + e, log_value = std::log(one_plus_e);
    const T rounded = one_plus_e - T(1);  // log1p(e) = log(1 + e) e / ((1 + e) - 1), exact where 1 + e rounds
    const T log1p_e = rounded == T(0) ? e : log_value * (e / (rounded == T(0) ? T(1) : rounded));
    softplus_p[i] = x > T(kSoftplusThreshold) ? x : (x > T(0) ? x : T(0)) + log1p_e;
    sigmoid_p[i] = (x >= T(0) ? T(1) : e) / one_plus_e;
  }
  return {softplus, sigmoid};
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

// The weights of one interaction block, in the order of `interaction_tensors` in hipnn_native.py.
struct Block {
  Tensor mu, sigma, matrix, self_weight, self_bias, res_weight, res_bias, adjust_weight;  // adjust: empty when f_in == f_out
  std::vector<std::vector<Tensor>> atom_layers;                                             // W1, b1, W2, b2 each
};

// What the force pass needs of a block's forward pass.
struct BlockRecord {
  Tensor features;                   // (n, f_in) input of the interaction
  Chunks chunks;
  std::vector<Tensor> values, slopes;  // per chunk (atoms, k, v)
  Tensor slope;                      // (n, f_out) sigmoid of the interaction
  std::vector<Tensor> layer_slopes;  // (n, f) sigmoid of every atom layer
};

template <typename T>
std::vector<Tensor> evaluate(const std::vector<Block>& blocks, const std::vector<double>& cutoffs, const std::vector<Tensor>& read_out_weights,
                             const std::vector<Tensor>& read_out_biases, Tensor features, const Tensor& neighbour_index,
                             const Tensor& distance, int64_t chunk_bytes) {
  const int64_t n_atoms = features.size(0), n_slots = neighbour_index.size(1);
  const Tensor flat_index = neighbour_index.reshape(-1);
  Tensor energies = torch::mv(features, read_out_weights[0][0]);
  std::map<double, Geometry> geometries;
  std::vector<BlockRecord> records(blocks.size());
  for (size_t b = 0; b < blocks.size(); ++b) {
    const Block& w = blocks[b];
    auto found = geometries.find(cutoffs[b]);
    if (found == geometries.end()) found = geometries.emplace(cutoffs[b], geometry<T>(distance, cutoffs[b])).first;
    const int64_t n_in = features.size(1), n_sens = w.mu.size(1);
    BlockRecord& record = records[b];
    record.features = features;
    record.chunks = slot_chunks(n_atoms, n_slots * (n_in + 4 * n_sens), sizeof(T), chunk_bytes);
    Tensor pre_activation = torch::addmm(w.self_bias, features, w.self_weight.t());
    for (const auto& [first, last] : record.chunks) {
      auto [values, slopes] = sensitivities<T>(found->second, w.mu, w.sigma, first, last);
      const Tensor rows = features.index_select(0, flat_index.narrow(0, first * n_slots, (last - first) * n_slots)).view({last - first, n_slots, n_in});
      const Tensor environment = torch::bmm(values.transpose(1, 2), rows).view({last - first, n_sens * n_in});
      pre_activation.narrow(0, first, last - first).addmm_(environment, w.matrix.t());
      record.values.push_back(values);
      record.slopes.push_back(slopes);
    }
    auto [softplus, sigmoid] = activation<T>(pre_activation);
    record.slope = sigmoid;
    Tensor output = torch::addmm(w.res_bias, softplus, w.res_weight.t());
    features = output.add_(w.adjust_weight.numel() ? features.mm(w.adjust_weight.t()) : features);
    for (const auto& layer : w.atom_layers) {
      auto [layer_softplus, layer_sigmoid] = activation<T>(torch::addmm(layer[1], features, layer[0].t()));
      record.layer_slopes.push_back(layer_sigmoid);
      features = torch::addmm(layer[3], layer_softplus, layer[2].t()).add_(features);
    }
    energies = torch::addmv(energies, features, read_out_weights[b + 1][0]).add_(read_out_biases[b]);
  }

  Tensor distance_gradient = torch::zeros({n_atoms, n_slots}, features.options());
  Tensor gradient = read_out_weights.back().expand({n_atoms, -1});  // dE/d(features of the last block)
  for (int64_t b = static_cast<int64_t>(blocks.size()) - 1; b >= 0; --b) {
    const Block& w = blocks[b];
    const BlockRecord& record = records[b];
    for (int64_t l = static_cast<int64_t>(w.atom_layers.size()) - 1; l >= 0; --l) {
      const auto& layer = w.atom_layers[l];
      gradient = torch::addmm(gradient, row_product(gradient, layer[2]).mul(record.layer_slopes[l]), layer[0]);
    }
    const Tensor pre_activation_gradient = row_product(gradient, w.res_weight).mul(record.slope);
    const int64_t n_in = record.features.size(1), n_sens = w.mu.size(1);
    Tensor input_gradient;
    if (b > 0) input_gradient = torch::addmm(w.adjust_weight.numel() ? gradient.mm(w.adjust_weight) : gradient, pre_activation_gradient, w.self_weight);
    for (size_t c = 0; c < record.chunks.size(); ++c) {
      const auto [first, last] = record.chunks[c];
      const Tensor index = flat_index.narrow(0, first * n_slots, (last - first) * n_slots);
      const Tensor environment_gradient = torch::mm(pre_activation_gradient.narrow(0, first, last - first), w.matrix).view({last - first, n_sens, n_in});
      const Tensor rows = record.features.index_select(0, index).view({last - first, n_slots, n_in});
      const Tensor sensitivity_gradient = torch::bmm(rows, environment_gradient.transpose(1, 2));  // (atoms, k, v) dE/ds
      const T* ds_dE = sensitivity_gradient.data_ptr<T>();
      const T* ds_dr = record.slopes[c].data_ptr<T>();
      T* out = distance_gradient.data_ptr<T>() + first * n_slots;
      for (int64_t slot = 0; slot < (last - first) * n_slots; ++slot) {
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t v = 0; v < n_sens; ++v) sum += ds_dE[slot * n_sens + v] * ds_dr[slot * n_sens + v];
        out[slot] += sum;
      }
      if (b > 0) input_gradient.index_add_(0, index, torch::bmm(record.values[c], environment_gradient).view({-1, n_in}));  // s dE/d(environment) to each neighbour
    }
    if (b > 0) gradient = input_gradient.add_(read_out_weights[b]);
  }
  return {energies, distance_gradient};
}

// interactions: per block mu, sigma, matrix, self W, self b, res W, res b, adjust W (empty when none);
// atom_layers: per block, per layer W1, b1, W2, b2.
std::vector<Tensor> energies_and_distance_gradient(const std::vector<Tensor>& interactions, const std::vector<Tensor>& atom_layers,
                                                   int64_t layers_per_block, const std::vector<double>& cutoffs,
                                                   const std::vector<Tensor>& read_out_weights, const std::vector<Tensor>& read_out_biases,
                                                   const Tensor& input_features, const Tensor& neighbour_index, const Tensor& distance,
                                                   int64_t chunk_bytes) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(interactions.size() == 8 * cutoffs.size(), "8 interaction tensors per block");
  TORCH_CHECK(atom_layers.size() == static_cast<size_t>(4 * layers_per_block) * cutoffs.size(), "4 tensors per atom layer");
  std::vector<Block> blocks(cutoffs.size());
  for (size_t b = 0; b < blocks.size(); ++b) {
    const Tensor* t = &interactions[8 * b];
    blocks[b] = Block{t[0].contiguous(), t[1].contiguous(), t[2], t[3], t[4], t[5], t[6], t[7], {}};
    for (int64_t l = 0; l < layers_per_block; ++l) {
      const Tensor* a = &atom_layers[4 * (b * layers_per_block + l)];
      blocks[b].atom_layers.push_back({a[0], a[1], a[2], a[3]});
    }
  }
  const Tensor features = input_features.contiguous(), index = neighbour_index.contiguous(), r = distance.contiguous();
  if (features.scalar_type() == torch::kFloat) return evaluate<float>(blocks, cutoffs, read_out_weights, read_out_biases, features, index, r, chunk_bytes);
  TORCH_CHECK(features.scalar_type() == torch::kDouble, "HIP-NN native kernels take float32 or float64, not ", features.scalar_type());
  return evaluate<double>(blocks, cutoffs, read_out_weights, read_out_biases, features, index, r, chunk_bytes);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("energies_and_distance_gradient", &energies_and_distance_gradient,
             "HIP-NN atom energies (n,) and dE/d(distance) (n, k) of every neighbour slot, for inference");
}
