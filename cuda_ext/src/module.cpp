// Python binding of the loader extension: a handful of functions over raw pointers.
// The GIL is released for every read; C++ errors become Python exceptions here, in one place.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>

#include "common.h"

namespace py = pybind11;
using namespace sllm;

namespace {

// sllm_knative's ChecksumError and LoadCancelled, injected by set_error_types. Held as
// owned raw references on purpose: they must outlive interpreter shutdown order.
PyObject* g_checksum_error = nullptr;
PyObject* g_cancelled_error = nullptr;

py::object or_builtin(PyObject* cls, const char* name) {
  return cls ? py::reinterpret_borrow<py::object>(cls) : py::module_::import("builtins").attr(name);
}

py::dict to_dict(const ReadStats& s) {
  py::dict d;
  d["bytes"] = s.bytes;
  d["seconds"] = s.seconds;
  d["direct"] = s.direct;
  d["direct_fallback"] = s.direct_fallback;
  d["threads"] = s.threads;
  d["chunk_bytes"] = s.chunk_bytes;
  return d;
}

ReadOptions options(uint64_t chunk_bytes, int threads, bool direct, uint64_t block_bytes,
                    std::vector<uint32_t> crcs, bool prefault = false) {
  // Validated before anything divides by it (chunk_bytes = 0 used to reach `%` below: SIGFPE).
  if (chunk_bytes == 0 || chunk_bytes % kDirectAlign != 0)
    throw std::invalid_argument("chunk_bytes must be a positive multiple of 4096");
  ReadOptions o;
  o.prefault = prefault;
  o.chunk_bytes = chunk_bytes;
  o.threads = threads;
  o.direct = direct;
  o.block_bytes = block_bytes;
  o.block_crcs = std::move(crcs);
  if (!o.block_crcs.empty() && (block_bytes == 0 || block_bytes % chunk_bytes != 0))
    throw std::invalid_argument("block_bytes must be a positive multiple of chunk_bytes when verifying");
  return o;
}

template <class F>
py::dict guarded(F&& f) {
  ReadStats s;
  {
    py::gil_scoped_release nogil;
    s = f();
  }
  return to_dict(s);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sllm-knative loader extension: chunked multi-threaded direct reads into host or device memory";

  py::class_<CancelToken>(m, "CancelToken")
      .def(py::init<>())
      .def("cancel", &CancelToken::cancel, "Ask every read using this token to stop at its next chunk.")
      .def_property_readonly("cancelled", &CancelToken::is_cancelled);

  m.def(
      "set_error_types",
      [](py::object checksum_error, py::object cancelled_error) {
        g_checksum_error = checksum_error.inc_ref().ptr();
        g_cancelled_error = cancelled_error.inc_ref().ptr();
      },
      "Install the Python exception classes raised for checksum mismatches and cancellations.");

  m.def(
      "crc32c", [](py::buffer b, uint32_t crc) {
        py::buffer_info info = b.request();
        uint64_t n = static_cast<uint64_t>(info.size) * static_cast<uint64_t>(info.itemsize);
        py::gil_scoped_release nogil;
        return crc32c(crc, info.ptr, n);
      },
      py::arg("data"), py::arg("crc") = 0, "crc32c of a buffer, continuing from crc.");

  m.def(
      "crc32c_ptr", [](uint64_t ptr, uint64_t n, uint32_t crc) {
        py::gil_scoped_release nogil;
        return crc32c(crc, reinterpret_cast<const void*>(ptr), n);
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("crc") = 0, "crc32c of host memory at ptr.");

  m.def("crc32c_hardware", &crc32c_hardware);

  m.def("bf16_linear_supported", &bf16_linear_supported,
        "Whether bf16_linear runs here: built with the intrinsics, and the CPU has AVX512-BF16.");
  m.def("amx_linear_supported", &amx_linear_supported,
        "Whether bf16_linear(amx=True) runs here: the kernel runs, the CPU has AMX-BF16, and Linux grants "
        "this process the tiles.");
  m.def(
      "bf16_linear",
      [](uint64_t x, uint64_t w, uint64_t bias, uint64_t y, int64_t m, int64_t n, int64_t k, int64_t batch,
         int64_t threads, bool amx, int64_t w_stride) {
        if (m < 0 || n < 1 || k < 1 || batch < 0)
          throw std::invalid_argument("bf16_linear: m = " + std::to_string(m) + ", n = " + std::to_string(n) +
                                      ", k = " + std::to_string(k) + ", batch = " + std::to_string(batch) +
                                      ": need m >= 0, n >= 1, k >= 1, batch >= 0");
        if (threads < 1 || threads > kMaxLinearThreads)
          throw std::invalid_argument("bf16_linear: threads = " + std::to_string(threads) + ": need 1 <= threads <= " +
                                      std::to_string(kMaxLinearThreads));
        if (w_stride != 0 && (w_stride < n * k || batch < 2))
          throw std::invalid_argument("bf16_linear: w_stride = " + std::to_string(w_stride) +
                                      ": need 0 (packed) or, for batch >= 2, at least n * k = " +
                                      std::to_string(n * k));
        py::gil_scoped_release nogil;
        bf16_linear(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(w),
                    reinterpret_cast<const uint16_t*>(bias), reinterpret_cast<uint16_t*>(y), m, n, k, batch,
                    static_cast<int>(threads), amx, w_stride);
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("y"), py::arg("m"), py::arg("n"), py::arg("k"),
      py::arg("batch") = 1, py::kw_only(), py::arg("threads") = 1, py::arg("amx") = false, py::arg("w_stride") = 0,
      "y [batch, m, n] = x [batch, m, k] @ w [batch, n, k]^T (+ bias [n]; 0 for none): contiguous bf16 at the "
      "given addresses, float32 accumulation, each row independent of the others (batch invariant).\n"
      "threads: the calling thread plus up to threads - 1 workers of a persistent pool, split by whole blocks of "
      "weight rows and by products; the result is the same bits for any count (small calls use one).\n"
      "amx: computed with AMX tiles (see amx_linear_supported): batch invariant too, other bits.\n"
      "w_stride: elements from product b's weight to product b + 1's (each [n, k] contiguous); 0: n * k.");

  m.def(
      "rms_norm_bf16",
      [](uint64_t x, uint64_t w, uint64_t y, int64_t rows, int64_t n, double eps) {
        if (rows < 0 || n < 1)
          throw std::invalid_argument("rms_norm_bf16: rows = " + std::to_string(rows) + ", n = " + std::to_string(n) +
                                      ": need rows >= 0, n >= 1");
        py::gil_scoped_release nogil;
        rms_norm_bf16(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(w),
                      reinterpret_cast<uint16_t*>(y), rows, n, static_cast<float>(eps));
      },
      py::arg("x"), py::arg("w"), py::arg("y"), py::arg("rows"), py::arg("n"), py::arg("eps"),
      "y [rows, n] = w [n] * bf16(x * rsqrt(mean(x^2) + eps)), per row of x [rows, n]: contiguous bf16 at the "
      "given addresses, float32 inside, each row on its own (batch invariant). Where bf16_linear_supported().");
  m.def(
      "rotary_bf16",
      [](uint64_t x, uint64_t cos, uint64_t sin, uint64_t y, int64_t rows, int64_t heads, int64_t d) {
        if (rows < 0 || heads < 1 || d < 32 || d % 32 != 0)
          throw std::invalid_argument("rotary_bf16: rows = " + std::to_string(rows) + ", heads = " +
                                      std::to_string(heads) + ", d = " + std::to_string(d) +
                                      ": need rows >= 0, heads >= 1, d a positive multiple of 32");
        py::gil_scoped_release nogil;
        rotary_bf16(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<const uint16_t*>(cos),
                    reinterpret_cast<const uint16_t*>(sin), reinterpret_cast<uint16_t*>(y), rows, heads, d);
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("y"), py::arg("rows"), py::arg("heads"), py::arg("d"),
      "y = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)) for x, y [rows, heads, d] and cos, sin [rows, d]: "
      "contiguous bf16 at the given addresses, each row on its own. Where bf16_linear_supported().");

  m.def(
      "read_to_host",
      [](const std::string& path, uint64_t file_offset, uint64_t dst, uint64_t length, uint64_t chunk_bytes,
         int threads, bool direct, uint64_t block_bytes, std::vector<uint32_t> crcs, CancelToken* cancel,
         bool prefault) {
        ReadOptions o = options(chunk_bytes, threads, direct, block_bytes, std::move(crcs), prefault);
        return guarded([&] { return read_to_host(path, file_offset, reinterpret_cast<void*>(dst), length, o, cancel); });
      },
      py::arg("path"), py::arg("file_offset"), py::arg("dst"), py::arg("length"), py::arg("chunk_bytes"),
      py::arg("threads"), py::arg("direct") = true, py::arg("block_bytes") = 0,
      py::arg("block_crcs") = std::vector<uint32_t>{}, py::arg("cancel") = nullptr, py::arg("prefault") = false,
      "Read [file_offset, file_offset+length) of path into host memory at dst (4096-aligned for direct I/O).\n"
      "prefault: fault fresh destination pages in on a separate thread, ahead of the readers.");

  m.def("cuda_available", [] {
#ifdef SLLM_WITH_CUDA
    return cuda_device_count() > 0;
#else
    return false;
#endif
  });
  m.def(
      "cuda_error",
      []() -> std::string {
#ifdef SLLM_WITH_CUDA
        return cuda_error();
#else
        return "built without CUDA (nvcc was not found when the extension was built)";
#endif
      },
      "'' when the extension's CUDA runtime sees a device, else why not (the CUDA error, runtime and driver).");
  m.def("cuda_compiled", [] {
#ifdef SLLM_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  m.def(
      "release_pinned",
      [] {
#ifdef SLLM_WITH_CUDA
        py::gil_scoped_release nogil;
        release_pinned();
#endif
      },
      "Free the pinned host rings that read_to_device keeps between reads (one per device).");

#ifdef SLLM_WITH_CUDA
  m.def(
      "read_to_device",
      [](const std::string& path, uint64_t file_offset, int device, uint64_t dptr, uint64_t length,
         uint64_t chunk_bytes, int threads, bool direct, uint64_t pinned_bytes, int streams, uint64_t block_bytes,
         std::vector<uint32_t> crcs, CancelToken* cancel) {
        ReadOptions o = options(chunk_bytes, threads, direct, block_bytes, std::move(crcs));
        return guarded([&] {
          return read_to_device(path, file_offset, device, reinterpret_cast<void*>(dptr), length, o, pinned_bytes,
                                streams, cancel);
        });
      },
      py::arg("path"), py::arg("file_offset"), py::arg("device"), py::arg("dptr"), py::arg("length"),
      py::arg("chunk_bytes"), py::arg("threads"), py::arg("direct") = true, py::arg("pinned_bytes") = 256ull << 20,
      py::arg("streams") = 4, py::arg("block_bytes") = 0, py::arg("block_crcs") = std::vector<uint32_t>{},
      py::arg("cancel") = nullptr,
      "Read a file range into device memory at dptr through a bounded ring of pinned buffers.\n"
      "The ring (pinned_bytes, capped at the read's chunks) is kept for the next read on the device.");
#endif

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const IoError& e) {
      py::object err = py::module_::import("builtins").attr("OSError")(e.err, e.what(), e.path);
      err.attr("offset") = e.offset;
      PyErr_SetObject(PyExc_OSError, err.ptr());
    } catch (const ChecksumMismatch& e) {
      py::object cls = or_builtin(g_checksum_error, "ValueError");
      py::object err = cls(e.path, e.block, e.offset, e.expected, e.actual);
      PyErr_SetObject(cls.ptr(), err.ptr());
    } catch (const Cancelled& e) {
      py::object cls = or_builtin(g_cancelled_error, "RuntimeError");
      PyErr_SetObject(cls.ptr(), cls(e.what()).ptr());
    }
  });
}
