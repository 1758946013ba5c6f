// medir_fast._runtime: the streaming runtime with a backend that calls a Python function
// (`Restorer.restore_normalized`). The GIL is released while pushing, popping and closing,
// and taken by the worker thread only around the call into Python. Wrapped by
// medir_fast/runtime.py, which owns the user-facing API and exceptions.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <set>

#include "medir_fast/runtime.hpp"

namespace py = pybind11;
using medir_fast::NanPolicy;
using medir_fast::PopStatus;
using medir_fast::PushStatus;
using medir_fast::Result;
using medir_fast::Stream;
using medir_fast::StreamConfig;

namespace {

constexpr double kMaxSeconds = 1e6;  // longest wait or timeout taken (keeps microseconds in range)

// Calls `fn(batch)` with an [n, h, w] float32 view of the worker's scratch buffer (no copy)
// and copies the [n, h, w] array it returns into `out`. Python errors become std::runtime_error
// carrying "Type: message", the reason the runtime reports for the failed slices.
medir_fast::CallbackBackend::Fn python_call(py::object fn) {
  auto holder = std::make_shared<py::object>(std::move(fn));
  return [holder](float* in, float* out, int64_t n, int64_t h, int64_t w) {
    py::gil_scoped_acquire gil;
    try {
      py::array_t<float> view({n, h, w}, in, py::capsule(in, [](void*) {}));
      py::object ret = (*holder)(view);
      auto arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(ret);
      if (!arr) throw std::runtime_error("the restore function returned " + std::string(py::str(py::type::of(ret))) +
                                         ", not an array");
      if (arr.ndim() != 3 || arr.shape(0) != n || arr.shape(1) != h || arr.shape(2) != w)
        throw std::runtime_error("the restore function returned shape " + std::string(py::str(arr.attr("shape"))) +
                                 ", expected (" + std::to_string(n) + ", " + std::to_string(h) + ", " +
                                 std::to_string(w) + ")");
      std::memcpy(out, arr.data(), static_cast<size_t>(n * h * w) * sizeof(float));
    } catch (py::error_already_set& e) {
      throw std::runtime_error(e.what());  // formatted while the GIL is held
    }
  };
}

class PyStream;
// Streams not yet closed; touched only with the GIL held. Closed by an atexit hook, while Python
// can still run their workers' calls into it (during finalisation a thread asking for the GIL
// is stopped dead, and the stream's destructor would wait on it).
std::set<PyStream*>& open_streams() {
  static auto* streams = new std::set<PyStream*>();  // never destroyed: used until the very end
  return *streams;
}

// Owns the C++ stream; every call copies the shared_ptr before releasing the GIL, so a close()
// from the producer never frees the stream under a consumer that is waiting in pop().
// The last reference always drops with the GIL held (the backend holds a Python object).
class PyStream {
 public:
  PyStream(py::object restore, float lo, float hi, int64_t height, int64_t width, int batch_size, int queue_depth,
           double max_wait, bool block, const std::string& nan_policy, const std::string& name) {
    StreamConfig c;
    c.lo = lo;
    c.hi = hi;
    c.height = height;
    c.width = width;
    c.batch_size = batch_size;
    c.queue_depth = queue_depth;
    if (!(max_wait >= 0 && max_wait <= kMaxSeconds))
      throw std::invalid_argument("max_wait must be between 0 and 1e6 seconds");
    c.max_wait = std::chrono::microseconds(static_cast<int64_t>(max_wait * 1e6));
    c.block = block;
    if (nan_policy == "error")
      c.nan_policy = NanPolicy::kError;
    else if (nan_policy == "zero")
      c.nan_policy = NanPolicy::kZero;
    else
      throw std::invalid_argument("nan_policy must be 'error' or 'zero', got '" + nan_policy + "'");
    auto backend = std::make_shared<medir_fast::CallbackBackend>(python_call(std::move(restore)), name);
    stream_ = std::make_shared<Stream>(c, std::move(backend));
    open_streams().insert(this);
  }

  ~PyStream() { close(); }

  bool push(const py::array& slice) {
    auto s = live();
    if (!slice.dtype().equal(py::dtype::of<float>()))
      throw std::invalid_argument("slice dtype must be float32, got " + std::string(py::str(slice.dtype())));
    if (slice.ndim() != 2)
      throw std::invalid_argument("slice must be 2-D [H, W], got " + std::to_string(slice.ndim()) + "-D");
    if (slice.strides(0) % sizeof(float) || slice.strides(1) % sizeof(float))
      throw std::invalid_argument("slice strides must be whole float32 elements");
    const auto* data = static_cast<const float*>(slice.data());
    const int64_t h = slice.shape(0), w = slice.shape(1);
    const int64_t rs = slice.strides(0) / sizeof(float), cs = slice.strides(1) / sizeof(float);
    // Try first with the GIL held; release it only to wait for room (fewer GIL hand-offs).
    PushStatus status = s->try_push(data, h, w, rs, cs);
    if (status == PushStatus::kFull && s->config().block) {
      py::gil_scoped_release nogil;
      status = s->push(data, h, w, rs, cs);
    }
    return status == PushStatus::kOk;
  }

  // -> ("ok", index, array) | ("failed", index, reason) | ("timeout",) | ("end",)
  py::tuple pop(std::optional<double> timeout) {
    if (!stream_) return py::make_tuple("end");  // closed: nothing more will come
    auto s = stream_;
    Result r;
    PopStatus status = s->pop(r, std::chrono::microseconds(0));  // ready already: no GIL hand-off
    if (status == PopStatus::kTimeout && timeout) {
      py::gil_scoped_release nogil;
      const double seconds = std::min(std::max(0.0, *timeout), kMaxSeconds);
      status = s->pop(r, std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6)));
    } else if (status == PopStatus::kTimeout) {
      // Wait in slices of 100 ms so that Ctrl-C reaches Python.
      for (;;) {
        {
          py::gil_scoped_release nogil;
          status = s->pop(r, std::chrono::milliseconds(100));
        }
        if (status != PopStatus::kTimeout) break;
        if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      }
    }
    if (status == PopStatus::kTimeout) return py::make_tuple("timeout");
    if (status == PopStatus::kEnd) return py::make_tuple("end");
    if (!r.ok()) return py::make_tuple("failed", r.index, r.error);
    auto* data = new std::vector<float>(std::move(r.data));
    py::capsule owner(data, [](void* p) { delete static_cast<std::vector<float>*>(p); });
    const int64_t h = s->height(), w = s->width();
    return py::make_tuple("ok", r.index, py::array_t<float>({h, w}, data->data(), owner));
  }

  void finish() { live()->finish(); }

  void close() {
    open_streams().erase(this);
    if (!stream_) return;
    {
      py::gil_scoped_release nogil;
      stream_->close();  // joins the worker, which may be waiting for the GIL
    }
    stream_.reset();
  }

  bool closed() const { return !stream_; }

 private:
  std::shared_ptr<Stream> live() const {
    if (!stream_) throw medir_fast::StreamClosed("stream closed");
    return stream_;
  }

  std::shared_ptr<Stream> stream_;
};

}  // namespace

PYBIND11_MODULE(_runtime, m) {
  m.doc() = "medir-fast streaming runtime (C++); use medir_fast.runtime.Stream";
  py::register_exception<medir_fast::StreamClosed>(m, "StreamClosed", PyExc_RuntimeError);
  py::class_<PyStream>(m, "Stream")
      .def(py::init<py::object, float, float, int64_t, int64_t, int, int, double, bool, const std::string&,
                    const std::string&>(),
           py::arg("restore"), py::arg("lo"), py::arg("hi"), py::arg("height"), py::arg("width"),
           py::arg("batch_size"), py::arg("queue_depth"), py::arg("max_wait"), py::arg("block"),
           py::arg("nan_policy"), py::arg("name"))
      .def("push", &PyStream::push, py::arg("slice"))
      .def("pop", &PyStream::pop, py::arg("timeout") = py::none())
      .def("finish", &PyStream::finish)
      .def("close", &PyStream::close)
      .def_property_readonly("closed", &PyStream::closed);
  py::module_::import("atexit").attr("register")(py::cpp_function([] {
    std::vector<PyStream*> streams(open_streams().begin(), open_streams().end());
    for (PyStream* s : streams) s->close();
  }));
}
