// Example host: restore a raw float32 volume slice by slice through the streaming runtime,
// the way scanner reconstruction software would feed it, with an AOTInductor package.
//
//   stream_volume PACKAGE.pt2 IN.raw OUT.raw DEPTH HEIGHT WIDTH LO HI [BATCH]
//
// IN.raw: DEPTH x HEIGHT x WIDTH float32, native byte order, slices contiguous, in the task's
// units; LO HI: the task's intensity range (ct_denoise: -1024 3071, pet_synthesis: 0 20,
// mri_sr: 0 4095). A reader thread pushes slices as it reads them; the main thread pops the
// restored slices in order and writes them to OUT.raw (through a temporary file, renamed at
// the end, so a failed run leaves no partial output). Exit 0 on success, 1 if restoring
// failed, 2 for bad arguments or input.
#include <chrono>
#include <cstdio>
#include <exception>
#include <fstream>
#include <string>
#include <thread>

#include "medir_fast/aoti_backend.hpp"
#include "medir_fast/runtime.hpp"

namespace {

int fail(int code, const std::string& message) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  return code;
}

long long parse_int(const char* s, const char* what) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
  }
  if (used == 0 || used != std::string(s).size() || v <= 0)
    throw std::invalid_argument(std::string(what) + " must be a positive integer, got '" + s + "'");
  return v;
}

float parse_float(const char* s, const char* what) {
  size_t used = 0;
  float v = 0.f;
  try {
    v = std::stof(s, &used);
  } catch (const std::exception&) {
  }
  if (used == 0 || used != std::string(s).size())
    throw std::invalid_argument(std::string(what) + " must be a number, got '" + s + "'");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9 && argc != 10)
    return fail(2, "usage: stream_volume PACKAGE.pt2 IN.raw OUT.raw DEPTH HEIGHT WIDTH LO HI [BATCH]");
  const std::string package = argv[1], in_path = argv[2], out_path = argv[3];
  long long depth, height, width;
  medir_fast::StreamConfig config;
  try {
    depth = parse_int(argv[4], "DEPTH");
    height = parse_int(argv[5], "HEIGHT");
    width = parse_int(argv[6], "WIDTH");
    config.lo = parse_float(argv[7], "LO");
    config.hi = parse_float(argv[8], "HI");
    config.batch_size = argc == 10 ? static_cast<int>(parse_int(argv[9], "BATCH")) : 8;
  } catch (const std::exception& e) {
    return fail(2, e.what());
  }
  config.height = height;
  config.width = width;
  config.queue_depth = 4 * config.batch_size;

  std::ifstream in(in_path, std::ios::binary | std::ios::ate);
  if (!in) return fail(2, "cannot read " + in_path);
  const long long plane = height * width, expected_bytes = depth * plane * 4;
  if (static_cast<long long>(in.tellg()) != expected_bytes)
    return fail(2, in_path + " has " + std::to_string(static_cast<long long>(in.tellg())) + " bytes, expected " +
                       std::to_string(expected_bytes) + " for " + std::to_string(depth) + "x" + std::to_string(height) +
                       "x" + std::to_string(width) + " float32");
  in.seekg(0);

  std::shared_ptr<medir_fast::AotiBackend> backend;
  std::unique_ptr<medir_fast::Stream> stream;
  try {
    backend = std::make_shared<medir_fast::AotiBackend>(package);
    stream = std::make_unique<medir_fast::Stream>(config, backend);
  } catch (const std::exception& e) {
    return fail(2, e.what());
  }

  const auto start = std::chrono::steady_clock::now();
  std::string reader_error;
  std::thread reader([&] {
    std::vector<float> slice(plane);
    try {
      for (long long z = 0; z < depth; ++z) {
        if (!in.read(reinterpret_cast<char*>(slice.data()), plane * 4)) throw std::runtime_error("read failed at slice " + std::to_string(z));
        stream->push(slice.data(), height, width);
      }
    } catch (const std::exception& e) {
      reader_error = e.what();  // a closed stream (backend failure) is reported by the consumer too
    }
    stream->finish();
  });

  const std::string tmp_path = out_path + ".partial";
  std::ofstream out(tmp_path, std::ios::binary | std::ios::trunc);
  std::string error = out ? "" : "cannot write " + tmp_path;
  long long written = 0;
  medir_fast::Result r;
  while (stream->pop(r) == medir_fast::PopStatus::kOk) {
    if (!error.empty()) continue;  // keep draining so the reader is never left blocked
    if (!r.ok()) {
      error = "slice " + std::to_string(r.index) + ": " + r.error;
    } else if (!out.write(reinterpret_cast<const char*>(r.data.data()), plane * 4)) {
      error = "cannot write " + tmp_path;
    } else {
      ++written;
    }
  }
  reader.join();
  out.close();
  if (error.empty() && !reader_error.empty()) error = reader_error;
  if (error.empty() && written != depth) error = "restored " + std::to_string(written) + " of " + std::to_string(depth) + " slices";
  if (!error.empty()) {
    std::remove(tmp_path.c_str());
    return fail(1, error);
  }
  if (std::rename(tmp_path.c_str(), out_path.c_str()) != 0) return fail(1, "cannot rename " + tmp_path + " to " + out_path);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("restored %lld slices %lldx%lld with %s on %s in %.3f s\n", depth, height, width, backend->name().c_str(),
              backend->device().c_str(), seconds);
  return 0;
}
