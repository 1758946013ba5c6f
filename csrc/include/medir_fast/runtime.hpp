// medir-fast streaming runtime: push slices as a scanner produces them, pop restored slices
// in push order. A worker thread batches slices (when a batch is full, or when the oldest
// waiting slice has waited `max_wait`), runs the backend and maps the output back to the
// task's intensity units. Memory is bounded by `queue_depth` slices; safe for one producer
// thread (push, finish) and one consumer thread (pop).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace medir_fast {

// Runs the network on a batch that is already normalised: `in` holds n slices of h x w
// float32 in [0, 1] (contiguous; the worker's scratch buffer, which the backend may overwrite
// but must not keep), `out` has room for the same; throw to report a failure.
// Knows nothing of tasks, queues or threads; it is only ever called from the worker thread.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // Why this backend cannot take h x w slices, or an empty string if it can.
  virtual std::string check_shape(int64_t h, int64_t w) const { (void)h; (void)w; return {}; }
  virtual void run(float* in, float* out, int64_t n, int64_t h, int64_t w) = 0;
};

// What to do with NaN or +-Inf in a pushed slice; the same names and meaning as the Python API's
// NAN_POLICIES ('error', 'zero') and the CLI's --nan-policy.
enum class NanPolicy {
  kError,  // reject the slice at push (std::invalid_argument); the stream stays usable
  kZero,   // NaN and +-Inf -> 0 in physical units before clip-and-scale: clip((0 - lo) / (hi - lo), 0, 1)
};

struct StreamConfig {
  float lo = 0.f;  // task intensity range: clip to [lo, hi], scale to [0, 1]; output mapped back
  float hi = 1.f;
  int64_t height = 0;  // slice size; 0 x 0 means "whatever the first pushed slice has"
  int64_t width = 0;
  int batch_size = 8;
  int queue_depth = 32;  // slices pushed and not yet popped, at most; >= batch_size
  std::chrono::microseconds max_wait{5000};  // a partial batch runs once its oldest slice waited this long
  bool block = true;  // full queue: push blocks (true) or returns PushStatus::kFull (false)
  NanPolicy nan_policy = NanPolicy::kError;
};

enum class PushStatus { kOk, kFull };
enum class PopStatus { kOk, kTimeout, kEnd };

// One restored slice. `error` is empty on success; a failed slice has no data and says why.
struct Result {
  uint64_t index = 0;  // position in push order (accepted pushes only)
  std::vector<float> data;  // height * width, row-major, task units
  std::string error;
  bool ok() const { return error.empty(); }
};

// Thrown by push() once the stream no longer accepts slices (after finish(), or after a
// backend failure, whose reason the message carries).
class StreamClosed : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Stream {
 public:
  Stream(StreamConfig config, std::shared_ptr<Backend> backend);
  // Stops the worker after the batch it is running; slices not yet popped are discarded.
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  // Copies one h x w slice (element strides given, so any float view works), clipping and
  // scaling it on the way in. Throws std::invalid_argument for a wrong size or (policy kError)
  // non-finite values, StreamClosed after finish() or a backend failure.
  PushStatus push(const float* data, int64_t h, int64_t w, int64_t row_stride, int64_t col_stride = 1) {
    return push_impl(data, h, w, row_stride, col_stride, config_.block);
  }
  PushStatus push(const float* data, int64_t h, int64_t w) { return push(data, h, w, w, 1); }
  // push() that returns kFull instead of blocking, whatever `block` says.
  PushStatus try_push(const float* data, int64_t h, int64_t w, int64_t row_stride, int64_t col_stride = 1) {
    return push_impl(data, h, w, row_stride, col_stride, false);
  }

  // Next result in push order. kTimeout when none arrived within `timeout` (nullopt: wait
  // for ever); kEnd once finish() (or a failure) happened and every result was popped.
  PopStatus pop(Result& out, std::optional<std::chrono::microseconds> timeout = std::nullopt);

  // No more slices: the partial batch runs now. Calling it again does nothing.
  void finish();
  // finish(), and stop the worker once its current batch is done; unpopped results are dropped.
  void close();

  const StreamConfig& config() const { return config_; }
  int64_t height() const;
  int64_t width() const;

 private:
  struct Pending {
    uint64_t index;
    std::vector<float> data;  // normalised
    std::chrono::steady_clock::time_point arrival;
  };

  PushStatus push_impl(const float* data, int64_t h, int64_t w, int64_t row_stride, int64_t col_stride, bool block);
  void worker_loop();
  bool batch_ready(std::chrono::steady_clock::time_point now) const;
  void fail_locked(std::vector<Pending>& batch, const std::string& reason);

  const StreamConfig config_;
  const float scale_;  // hi - lo
  std::shared_ptr<Backend> backend_;

  mutable std::mutex mu_;
  std::condition_variable can_push_;   // room in the queue, or closed
  std::condition_variable can_pop_;    // a result, or the end
  std::condition_variable has_work_;   // a slice, finish, or stop
  std::deque<Pending> pending_;
  std::deque<Result> results_;
  std::vector<std::vector<float>> spare_;  // input buffers the worker is done with, reused by push (at most queue_depth)
  int64_t height_, width_;
  uint64_t next_index_ = 0;
  int64_t in_flight_ = 0;  // pushed and not yet popped
  uint64_t batches_run_ = 0;
  bool finished_ = false;
  bool stop_ = false;
  bool worker_done_ = false;
  std::string failure_;  // non-empty once the backend failed
  std::thread worker_;
};

// A backend that calls a function: the Python binding wraps `Restorer.restore_normalized`
// with it; C++ hosts and tests can plug in anything.
class CallbackBackend : public Backend {
 public:
  using Fn = std::function<void(float* in, float* out, int64_t n, int64_t h, int64_t w)>;
  CallbackBackend(Fn fn, std::string name = "callback") : fn_(std::move(fn)), name_(std::move(name)) {}
  std::string name() const override { return name_; }
  void run(float* in, float* out, int64_t n, int64_t h, int64_t w) override { fn_(in, out, n, h, w); }

 private:
  Fn fn_;
  std::string name_;
};

}  // namespace medir_fast
