#include "medir_fast/aoti_backend.hpp"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace medir_fast {

namespace {

constexpr int64_t kMinSize = 9;           // the prompt network's two stride-3 convolutions
constexpr int64_t kMinNetworkSize = 16;   // smallest multiple of 8 that is >= kMinSize

// The padded size the network runs at (same rule as medir_fast.restorer.network_size).
int64_t network_size(int64_t n) { return std::max(kMinNetworkSize, (n + 7) / 8 * 8); }

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

std::string sizes_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

}  // namespace

struct AotiBackend::Impl {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  std::string device;
};

AotiBackend::AotiBackend(const std::string& package_path) : impl_(std::make_unique<Impl>()) {
  if (!std::ifstream(package_path).good())
    throw std::runtime_error("AOTInductor package not found or unreadable: " + package_path);
  try {
    impl_->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package_path);
    auto metadata = impl_->loader->get_metadata();
    auto it = metadata.find("AOTI_DEVICE_KEY");
    if (it == metadata.end()) throw std::runtime_error("the package does not say which device it was compiled for");
    impl_->device = it->second;
  } catch (const c10::Error& e) {
    throw std::runtime_error("cannot load AOTInductor package " + package_path + ": " +
                             first_line(e.what_without_backtrace()));
  }
}

AotiBackend::~AotiBackend() = default;

const std::string& AotiBackend::device() const { return impl_->device; }

std::string AotiBackend::check_shape(int64_t h, int64_t w) const {
  if (h < kMinSize || w < kMinSize)
    return "slice " + std::to_string(h) + "x" + std::to_string(w) + " is too small: AMIR needs at least " +
           std::to_string(kMinSize) + "x" + std::to_string(kMinSize) + " pixels";
  return {};
}

void AotiBackend::run(float* in, float* out, int64_t n, int64_t h, int64_t w) {
  try {
    c10::InferenceMode guard;
    at::Tensor x = at::from_blob(in, {n, 1, h, w}, at::kFloat).to(at::Device(impl_->device));
    const int64_t pad_h = network_size(h) - h, pad_w = network_size(w) - w;
    if (pad_h || pad_w) x = at::reflection_pad2d(x, {0, pad_w, 0, pad_h});
    std::vector<at::Tensor> outputs = impl_->loader->run({x});
    if (outputs.size() != 1 || !outputs[0].sizes().equals(x.sizes()))
      throw std::runtime_error("the package returned " + std::to_string(outputs.size()) + " output(s) shaped " +
                               (outputs.empty() ? std::string("-") : sizes_str(outputs[0])) + ", expected one shaped " +
                               sizes_str(x));
    at::Tensor y = outputs[0].slice(2, 0, h).slice(3, 0, w).to(at::kCPU, at::kFloat).contiguous();
    std::memcpy(out, y.data_ptr<float>(), static_cast<size_t>(n * h * w) * sizeof(float));
  } catch (const c10::Error& e) {
    throw std::runtime_error(first_line(e.what_without_backtrace()));
  }
}

}  // namespace medir_fast
