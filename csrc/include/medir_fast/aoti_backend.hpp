// Backend that runs an AOTInductor package (`.pt2`, made by `medir-fast export --format aoti`)
// through libtorch's AOTIModelPackageLoader, on the device the package was compiled for
// (CPU, or CUDA). Slices whose sides are not multiples of 8 are reflect-padded right and
// bottom and cropped back, as the Python Restorer does. Only this library links libtorch.
#pragma once

#include <memory>
#include <string>

#include "medir_fast/runtime.hpp"

namespace medir_fast {

class AotiBackend : public Backend {
 public:
  // Throws std::runtime_error with a one-line reason if the package cannot be loaded.
  explicit AotiBackend(const std::string& package_path);
  ~AotiBackend() override;
  std::string name() const override { return "aoti"; }
  std::string check_shape(int64_t h, int64_t w) const override;
  void run(float* in, float* out, int64_t n, int64_t h, int64_t w) override;
  // The device the package runs on: "cpu" or "cuda".
  const std::string& device() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace medir_fast
