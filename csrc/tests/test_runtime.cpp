// Tests of the streaming runtime with callback backends; one ctest case per function:
// `test_runtime NAME`. A failed CHECK prints where and exits non-zero.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "medir_fast/runtime.hpp"

using namespace medir_fast;
using namespace std::chrono_literals;

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                          \
    }                                                                        \
  } while (0)

template <class E, class F>
std::string expect_throw(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  std::fprintf(stderr, "expected an exception, none was thrown\n");
  std::exit(1);
}

namespace {

constexpr float kLo = -1024.f, kHi = 3071.f;

// A stand-in network that is easy to compute by hand: y = 1 - x^2 (x normalised).
float net(float x) { return 1.f - x * x; }

std::shared_ptr<Backend> square_backend(std::function<void(int64_t batch)> before = {}) {
  auto batches = std::make_shared<int64_t>(0);
  return std::make_shared<CallbackBackend>([=](float* in, float* out, int64_t n, int64_t h, int64_t w) {
    if (before) before((*batches)++);
    for (int64_t i = 0; i < n * h * w; ++i) out[i] = net(in[i]);
  }, "square");
}

// What the stream must return for one physical value: clip-and-scale, network, inverse.
float expected(float v) {
  float s = (v - kLo) / (kHi - kLo);
  s = s > 0.f ? (s < 1.f ? s : 1.f) : 0.f;
  return net(s) * (kHi - kLo) + kLo;
}

std::vector<float> random_slice(std::mt19937& rng, int64_t h, int64_t w) {
  std::uniform_real_distribution<float> u(-1500.f, 3500.f);  // reaches outside the range: clipping is exercised
  std::vector<float> s(h * w);
  for (float& v : s) v = u(rng);
  return s;
}

void check_result(const Result& r, const std::vector<float>& input) {
  CHECK(r.ok());
  CHECK(r.data.size() == input.size());
  for (size_t i = 0; i < input.size(); ++i) CHECK(std::fabs(r.data[i] - expected(input[i])) <= 1e-3f);
}

StreamConfig config(int64_t h, int64_t w, int batch = 4, int depth = 16) {
  StreamConfig c;
  c.lo = kLo;
  c.hi = kHi;
  c.height = h;
  c.width = w;
  c.batch_size = batch;
  c.queue_depth = depth;
  c.max_wait = 2ms;
  return c;
}

// Pops until the end; fails the test if the stream hangs.
std::vector<Result> drain(Stream& s) {
  std::vector<Result> out;
  for (;;) {
    Result r;
    PopStatus st = s.pop(r, 10s);
    CHECK(st != PopStatus::kTimeout);
    if (st == PopStatus::kEnd) return out;
    out.push_back(std::move(r));
  }
}

void order_and_content() {
  std::mt19937 rng(1);
  Stream s(config(6, 10), square_backend());
  std::vector<std::vector<float>> inputs;
  for (int i = 0; i < 37; ++i) inputs.push_back(random_slice(rng, 6, 10));  // not a multiple of the batch
  std::thread producer([&] {  // more slices than the queue holds: it blocks until the consumer pops
    for (auto& x : inputs) CHECK(s.push(x.data(), 6, 10) == PushStatus::kOk);
    s.finish();
  });
  auto results = drain(s);
  producer.join();
  CHECK(results.size() == inputs.size());
  for (size_t i = 0; i < results.size(); ++i) {
    CHECK(results[i].index == i);
    check_result(results[i], inputs[i]);
  }
  // A strided (transposed) view is read as such.
  Stream t(config(10, 6), square_backend());
  const auto& x = inputs[0];  // 6 x 10 row-major; its transpose is 10 x 6 with strides (1, 10)
  CHECK(t.push(x.data(), 10, 6, 1, 10) == PushStatus::kOk);
  t.finish();
  auto rt = drain(t);
  CHECK(rt.size() == 1);
  for (int64_t r = 0; r < 10; ++r)
    for (int64_t c = 0; c < 6; ++c) CHECK(std::fabs(rt[0].data[r * 6 + c] - expected(x[c * 10 + r])) <= 1e-3f);
}

void wrong_size() {
  std::mt19937 rng(2);
  StreamConfig c = config(0, 0);  // size from the first slice
  Stream s(c, square_backend());
  auto a = random_slice(rng, 8, 8), b = random_slice(rng, 8, 9);
  CHECK(s.push(a.data(), 8, 8) == PushStatus::kOk);
  std::string why = expect_throw<std::invalid_argument>([&] { s.push(b.data(), 8, 9); });
  CHECK(why.find("8x9") != std::string::npos && why.find("8x8") != std::string::npos);
  CHECK(s.push(a.data(), 8, 8) == PushStatus::kOk);  // still usable
  s.finish();
  auto results = drain(s);
  CHECK(results.size() == 2 && results[1].index == 1);
  check_result(results[1], a);
  expect_throw<std::invalid_argument>([&] { Stream bad(config(4, 4, 8, 4), square_backend()); });  // depth < batch
}

void nan_error() {
  Stream s(config(2, 2), square_backend());
  std::vector<float> bad{0.f, NAN, INFINITY, 5.f}, good{0.f, 1.f, 2.f, 3.f};
  std::string why = expect_throw<std::invalid_argument>([&] { s.push(bad.data(), 2, 2); });
  CHECK(why.find("2 non-finite") != std::string::npos);
  CHECK(s.push(good.data(), 2, 2) == PushStatus::kOk);
  s.finish();
  auto results = drain(s);
  CHECK(results.size() == 1 && results[0].index == 0);
  check_result(results[0], good);
}

void nan_zero() {
  // NaN and +-Inf are 0 in physical units before clip-and-scale, as the Python API's 'zero' policy:
  // the network sees clip((0 - lo) / (hi - lo), 0, 1), which for CT (lo = -1024) is 1024 / 4095, not 0.
  for (float lo : {kLo, 0.f}) {
    StreamConfig c = config(2, 2);
    c.lo = lo;
    c.hi = kHi;
    c.nan_policy = NanPolicy::kZero;
    auto seen = std::make_shared<std::vector<float>>();
    Stream s(c, std::make_shared<CallbackBackend>([seen](float* in, float* out, int64_t n, int64_t h, int64_t w) {
      seen->assign(in, in + n * h * w);
      for (int64_t i = 0; i < n * h * w; ++i) out[i] = net(in[i]);
    }, "square"));
    std::vector<float> bad{NAN, INFINITY, -INFINITY, 5.f};
    CHECK(s.push(bad.data(), 2, 2) == PushStatus::kOk);
    s.finish();
    auto results = drain(s);
    CHECK(results.size() == 1 && results[0].ok());
    const float zero = (0.f - lo) / (kHi - lo);
    CHECK(seen->size() == 4);
    for (int i = 0; i < 3; ++i) CHECK((*seen)[i] == zero);  // NaN, +Inf, -Inf -> normalised 0 physical
    CHECK(std::fabs((*seen)[3] - (5.f - lo) / (kHi - lo)) < 1e-6f);
    const auto& d = results[0].data;
    for (int i = 0; i < 3; ++i) CHECK(std::fabs(d[i] - (net(zero) * (kHi - lo) + lo)) < 1e-3f);
    CHECK(std::isfinite(d[3]));
  }
}

void backend_throws() {
  // Batch 2 (slices 8..11) throws: 0..7 are delivered, 8.. are reported failed with the reason.
  std::mt19937 rng(3);
  StreamConfig c = config(4, 4, 4, 40);
  c.max_wait = 60s;  // batches form only when full (or at finish), so batch 2 is slices 8..11
  Stream s(c, square_backend([](int64_t k) {
    if (k == 2) throw std::runtime_error("out of memory (test)");
  }));
  std::vector<std::vector<float>> inputs;
  for (int i = 0; i < 20; ++i) inputs.push_back(random_slice(rng, 4, 4));
  int accepted = 0;
  for (auto& x : inputs) {
    try {
      s.push(x.data(), 4, 4);
      ++accepted;
    } catch (const StreamClosed& e) {  // pushes after the failure are refused with the reason
      CHECK(std::string(e.what()).find("out of memory (test)") != std::string::npos);
    }
  }
  auto results = drain(s);
  CHECK(static_cast<int>(results.size()) == accepted);
  CHECK(accepted >= 12);
  for (int i = 0; i < accepted; ++i) {
    CHECK(results[i].index == static_cast<uint64_t>(i));
    if (i < 8) {
      check_result(results[i], inputs[i]);
    } else {
      CHECK(!results[i].ok() && results[i].data.empty());
      CHECK(results[i].error.find("batch 2") != std::string::npos);
      CHECK(results[i].error.find("out of memory (test)") != std::string::npos);
    }
  }
  expect_throw<StreamClosed>([&] { s.push(inputs[0].data(), 4, 4); });
  s.finish();  // harmless after a failure
}

void finish_twice() {
  std::mt19937 rng(4);
  Stream s(config(4, 4), square_backend());
  auto x = random_slice(rng, 4, 4);
  s.push(x.data(), 4, 4);
  s.finish();
  s.finish();
  auto results = drain(s);
  CHECK(results.size() == 1);
  check_result(results[0], x);
  Result r;
  CHECK(s.pop(r, 10ms) == PopStatus::kEnd);  // stays ended
}

void push_after_finish() {
  std::mt19937 rng(5);
  Stream s(config(4, 4), square_backend());
  auto x = random_slice(rng, 4, 4);
  s.finish();
  std::string why = expect_throw<StreamClosed>([&] { s.push(x.data(), 4, 4); });
  CHECK(why.find("finish") != std::string::npos);
  CHECK(drain(s).empty());
}

void destroy_in_flight() {
  // A slow backend, a full queue, nothing popped: the destructor must return and free everything.
  std::mt19937 rng(6);
  std::atomic<int> batches{0};
  {
    Stream s(config(4, 4, 2, 8), square_backend([&](int64_t) {
      ++batches;
      std::this_thread::sleep_for(20ms);
    }));
    auto x = random_slice(rng, 4, 4);
    for (int i = 0; i < 8; ++i) s.push(x.data(), 4, 4);
    std::this_thread::sleep_for(5ms);
  }
  CHECK(batches.load() >= 1);
  {
    Stream never_used(config(4, 4), square_backend());
  }
}

void close_wakes_consumer() {
  // A consumer blocked in pop() and a producer blocked in push() are both released by close().
  std::mt19937 rng(7);
  auto s = std::make_unique<Stream>(config(4, 4, 1, 1), square_backend([](int64_t) { std::this_thread::sleep_for(50ms); }));
  auto x = random_slice(rng, 4, 4);
  CHECK(s->push(x.data(), 4, 4) == PushStatus::kOk);
  std::atomic<bool> push_returned{false};
  std::thread producer([&] {
    try {
      s->push(x.data(), 4, 4);  // blocks: queue depth 1 and nothing popped
    } catch (const StreamClosed&) {
    }
    push_returned = true;
  });
  std::vector<Result> results;
  std::thread consumer([&] { results = drain(*s); });  // the running batch is delivered, then the end
  std::this_thread::sleep_for(10ms);
  s->close();
  producer.join();
  consumer.join();
  CHECK(push_returned.load());
  // The running batch is delivered; a slice pushed before close() (if the machine was slow
  // enough for a pop to make room) is reported failed or restored, never lost.
  CHECK(!results.empty() && results.size() <= 2 && results[0].ok());
  for (size_t i = 0; i < results.size(); ++i) CHECK(results[i].index == i);
  s.reset();
}

void nonblocking_full() {
  std::mt19937 rng(8);
  StreamConfig c = config(4, 4, 2, 2);
  c.block = false;
  Stream s(c, square_backend());
  auto x = random_slice(rng, 4, 4);
  CHECK(s.push(x.data(), 4, 4) == PushStatus::kOk);
  CHECK(s.push(x.data(), 4, 4) == PushStatus::kOk);
  CHECK(s.push(x.data(), 4, 4) == PushStatus::kFull);
  Result r;
  CHECK(s.pop(r, 10s) == PopStatus::kOk && r.index == 0);
  CHECK(s.push(x.data(), 4, 4) == PushStatus::kOk);  // room again; the refused push took no index
  s.finish();
  auto rest = drain(s);
  CHECK(rest.size() == 2 && rest[0].index == 1 && rest[1].index == 2);

  // try_push never blocks, even on a blocking stream.
  Stream b(config(4, 4, 1, 1), square_backend());
  CHECK(b.try_push(x.data(), 4, 4, 4) == PushStatus::kOk);
  CHECK(b.try_push(x.data(), 4, 4, 4) == PushStatus::kFull);
}

void max_wait_flush() {
  // One slice, batch size 8, no finish(): it must come back once max_wait passed.
  std::mt19937 rng(9);
  StreamConfig c = config(4, 4, 8, 8);
  c.max_wait = 20ms;
  Stream s(c, square_backend());
  auto x = random_slice(rng, 4, 4);
  auto t0 = std::chrono::steady_clock::now();
  s.push(x.data(), 4, 4);
  Result r;
  CHECK(s.pop(r, 5s) == PopStatus::kOk);
  CHECK(std::chrono::steady_clock::now() - t0 >= 20ms);
  check_result(r, x);
}

void stress() {
  // Thousands of small slices, random delays on both sides and in the backend.
  constexpr int kSlices = 3000;
  std::mt19937 rng(10);
  std::vector<std::vector<float>> inputs;
  for (int i = 0; i < kSlices; ++i) inputs.push_back(random_slice(rng, 3, 5));
  StreamConfig c = config(3, 5, 7, 20);
  c.max_wait = 200us;
  Stream s(c, square_backend([](int64_t k) {
    if (k % 13 == 0) std::this_thread::sleep_for(std::chrono::microseconds(k % 300));
  }));
  std::thread producer([&] {
    std::mt19937 r(11);
    for (auto& x : inputs) {
      if (r() % 10 == 0) std::this_thread::sleep_for(std::chrono::microseconds(r() % 400));
      CHECK(s.push(x.data(), 3, 5) == PushStatus::kOk);
    }
    s.finish();
  });
  std::mt19937 r(12);
  size_t n = 0;
  for (;;) {
    if (r() % 10 == 0) std::this_thread::sleep_for(std::chrono::microseconds(r() % 400));
    Result res;
    PopStatus st = s.pop(res, 10s);
    CHECK(st != PopStatus::kTimeout);
    if (st == PopStatus::kEnd) break;
    CHECK(res.index == n);
    check_result(res, inputs[n]);
    ++n;
  }
  producer.join();
  CHECK(n == kSlices);
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, void (*)()> tests{
      {"order_and_content", order_and_content}, {"wrong_size", wrong_size},
      {"nan_error", nan_error}, {"nan_zero", nan_zero},
      {"backend_throws", backend_throws}, {"finish_twice", finish_twice},
      {"push_after_finish", push_after_finish}, {"destroy_in_flight", destroy_in_flight},
      {"close_wakes_consumer", close_wakes_consumer}, {"nonblocking_full", nonblocking_full},
      {"max_wait_flush", max_wait_flush}, {"stress", stress},
  };
  if (argc != 2 || !tests.count(argv[1])) {
    std::fprintf(stderr, "usage: test_runtime NAME (one of:");
    for (auto& [name, fn] : tests) std::fprintf(stderr, " %s", name.c_str());
    std::fprintf(stderr, ")\n");
    return 2;
  }
  tests.at(argv[1])();
  std::printf("%s: ok\n", argv[1]);
  return 0;
}
