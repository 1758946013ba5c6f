#include "medir_fast/runtime.hpp"

#include <algorithm>
#ifdef __GLIBCXX__
#include <cxxabi.h>
#endif
#include <cmath>
#include <cstring>
#include <exception>

namespace medir_fast {

namespace {

using Clock = std::chrono::steady_clock;

std::string shape_str(int64_t h, int64_t w) { return std::to_string(h) + "x" + std::to_string(w); }

// Clip-and-scale one row into `dst` as Task.normalize does ((x - lo) / (hi - lo), clipped to
// [0, 1], in float32). A NaN or +-Inf value is taken as 0 in physical units first (the 'zero'
// NaN policy, as restore_file applies it), so it becomes clip((0 - lo) / (hi - lo), 0, 1).
// Returns how many values were NaN or +-Inf (the 'error' policy rejects the slice if any).
// Branch-free (selects only), and instantiated for unit stride, so that the compiler vectorises it.
template <bool kUnitStride>
int normalize_row(const float* src, int64_t stride, int64_t n, float lo, float scale, float* dst) {
  int non_finite = 0;
  for (int64_t x = 0; x < n; ++x) {
    const float raw = kUnitStride ? src[x] : src[x * stride];
    const bool finite = (raw - raw) == 0.f;  // raw - raw is NaN exactly for NaN and +-Inf
    non_finite += !finite;
    const float v = finite ? raw : 0.f;
    const float s = (v - lo) / scale;
    dst[x] = s > 0.f ? (s < 1.f ? s : 1.f) : 0.f;
  }
  return non_finite;
}

}  // namespace

Stream::Stream(StreamConfig config, std::shared_ptr<Backend> backend)
    : config_(config), scale_(config.hi - config.lo), backend_(std::move(backend)),
      height_(config.height), width_(config.width) {
  if (!backend_) throw std::invalid_argument("stream needs a backend");
  if (!std::isfinite(config.lo) || !std::isfinite(config.hi) || !(config.hi > config.lo))
    throw std::invalid_argument("intensity range must be finite with lo < hi, got [" + std::to_string(config.lo) +
                                ", " + std::to_string(config.hi) + "]");
  if (config.batch_size < 1) throw std::invalid_argument("batch size must be >= 1");
  if (config.queue_depth < config.batch_size)
    throw std::invalid_argument("queue depth (" + std::to_string(config.queue_depth) +
                                ") must be >= batch size (" + std::to_string(config.batch_size) + ")");
  if (config.max_wait.count() < 0) throw std::invalid_argument("max wait must be >= 0");
  if ((config.height == 0) != (config.width == 0) || config.height < 0 || config.width < 0)
    throw std::invalid_argument("slice size must be positive (or 0x0: taken from the first slice), got " +
                                shape_str(config.height, config.width));
  if (config.height > 0) {
    std::string why = backend_->check_shape(config.height, config.width);
    if (!why.empty()) throw std::invalid_argument(why);
  }
  worker_ = std::thread(&Stream::worker_loop, this);
}

Stream::~Stream() { close(); }

int64_t Stream::height() const {
  std::lock_guard<std::mutex> lk(mu_);
  return height_;
}

int64_t Stream::width() const {
  std::lock_guard<std::mutex> lk(mu_);
  return width_;
}

PushStatus Stream::push_impl(const float* data, int64_t h, int64_t w, int64_t row_stride, int64_t col_stride,
                             bool block) {
  std::vector<float> slice;
  auto closed_reason = [this]() -> std::string {
    if (!failure_.empty()) return "stream closed: " + failure_;
    if (stop_) return "stream closed";
    if (finished_) return "push after finish()";
    return {};
  };
  {
    std::unique_lock<std::mutex> lk(mu_);
    if (auto why = closed_reason(); !why.empty()) throw StreamClosed(why);
    if (height_ == 0) {
      if (h <= 0 || w <= 0) throw std::invalid_argument("slice size must be positive, got " + shape_str(h, w));
      std::string why = backend_->check_shape(h, w);
      if (!why.empty()) throw std::invalid_argument(why);
    } else if (h != height_ || w != width_) {
      throw std::invalid_argument("slice is " + shape_str(h, w) + ", the stream takes " + shape_str(height_, width_));
    }
    // Only this producer adds slices, so room seen here is still there after normalising.
    if (in_flight_ >= config_.queue_depth) {
      if (!block) return PushStatus::kFull;
      can_push_.wait(lk, [&] { return in_flight_ < config_.queue_depth || !closed_reason().empty(); });
      if (auto why = closed_reason(); !why.empty()) throw StreamClosed(why);
    }
    if (!spare_.empty()) {  // reuse a buffer the worker is done with: no allocation, no page faults
      slice = std::move(spare_.back());
      spare_.pop_back();
    }
  }

  slice.resize(static_cast<size_t>(h * w));
  int64_t non_finite = 0;
  for (int64_t y = 0; y < h; ++y) {
    const float* row = data + y * row_stride;
    float* dst = slice.data() + y * w;
    non_finite += col_stride == 1 ? normalize_row<true>(row, 1, w, config_.lo, scale_, dst)
                                  : normalize_row<false>(row, col_stride, w, config_.lo, scale_, dst);
  }
  if (non_finite > 0 && config_.nan_policy == NanPolicy::kError)
    throw std::invalid_argument("slice has " + std::to_string(non_finite) +
                                " non-finite values (NaN/Inf) and the NaN policy is 'error'");

  std::lock_guard<std::mutex> lk(mu_);
  if (auto why = closed_reason(); !why.empty()) throw StreamClosed(why);
  height_ = h;
  width_ = w;
  pending_.push_back(Pending{next_index_++, std::move(slice), Clock::now()});
  ++in_flight_;
  has_work_.notify_one();
  return PushStatus::kOk;
}

PopStatus Stream::pop(Result& out, std::optional<std::chrono::microseconds> timeout) {
  std::unique_lock<std::mutex> lk(mu_);
  auto ready = [this] { return !results_.empty() || worker_done_; };
  if (timeout) {
    if (!can_pop_.wait_for(lk, *timeout, ready)) return PopStatus::kTimeout;
  } else {
    can_pop_.wait(lk, ready);
  }
  if (results_.empty()) return PopStatus::kEnd;
  out = std::move(results_.front());
  results_.pop_front();
  --in_flight_;
  can_push_.notify_one();
  return PopStatus::kOk;
}

void Stream::finish() {
  std::lock_guard<std::mutex> lk(mu_);
  finished_ = true;
  has_work_.notify_one();
}

void Stream::close() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    finished_ = true;
    stop_ = true;  // the worker reports what is still pending, after its current batch (push order)
    has_work_.notify_one();
    can_push_.notify_all();
  }
  if (worker_.joinable() && worker_.get_id() != std::this_thread::get_id()) worker_.join();
}

bool Stream::batch_ready(Clock::time_point now) const {
  if (pending_.empty()) return false;
  return static_cast<int64_t>(pending_.size()) >= config_.batch_size || finished_ ||
         now >= pending_.front().arrival + config_.max_wait;
}

void Stream::fail_locked(std::vector<Pending>& batch, const std::string& reason) {
  for (Pending& p : batch) results_.push_back(Result{p.index, {}, reason});
  for (Pending& p : pending_) results_.push_back(Result{p.index, {}, "not run: " + reason});
  pending_.clear();
}

void Stream::worker_loop() {
  std::vector<float> in, out;
  std::vector<Pending> batch;
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    while (!stop_ && !batch_ready(Clock::now()) && !(finished_ && pending_.empty())) {
      if (pending_.empty())
        has_work_.wait(lk);
      else
        has_work_.wait_until(lk, pending_.front().arrival + config_.max_wait);
    }
    if (stop_) {
      for (Pending& p : pending_) results_.push_back(Result{p.index, {}, "stream closed before the slice was restored"});
      pending_.clear();
      break;
    }
    if (pending_.empty()) break;

    const size_t n = std::min(pending_.size(), static_cast<size_t>(config_.batch_size));
    batch.clear();
    for (size_t i = 0; i < n; ++i) {
      batch.push_back(std::move(pending_.front()));
      pending_.pop_front();
    }
    const int64_t h = height_, w = width_, plane = h * w;
    const uint64_t batch_number = batches_run_++;
    lk.unlock();

    std::string error;
    std::vector<Result> done;
    try {
      in.resize(n * plane);
      out.resize(n * plane);
      for (size_t i = 0; i < n; ++i) std::memcpy(in.data() + i * plane, batch[i].data.data(), plane * sizeof(float));
      backend_->run(in.data(), out.data(), static_cast<int64_t>(n), h, w);
      done.reserve(n);
      for (size_t i = 0; i < n; ++i) {
        const float* src = out.data() + i * plane;
        Result r{batch[i].index, std::vector<float>(src, src + plane), {}};  // copy, then in place (cache-hot)
        for (float& v : r.data) v = v * scale_ + config_.lo;
        done.push_back(std::move(r));
      }
    } catch (const std::exception& e) {
      error = e.what();
#ifdef __GLIBCXX__
    } catch (abi::__forced_unwind&) {
      throw;  // the thread is being cancelled (e.g. it asked an exiting Python for the GIL): let it go
#endif
    } catch (...) {
      error = "unknown exception";
    }

    lk.lock();
    for (Pending& p : batch) spare_.push_back(std::move(p.data));
    if (error.empty()) {
      for (Result& r : done) results_.push_back(std::move(r));
    } else {
      failure_ = "backend '" + backend_->name() + "' failed on batch " + std::to_string(batch_number) + ": " + error;
      fail_locked(batch, failure_);
      can_push_.notify_all();
    }
    can_pop_.notify_all();
    if (!failure_.empty()) break;
  }
  worker_done_ = true;
  can_pop_.notify_all();
  can_push_.notify_all();
}

}  // namespace medir_fast
