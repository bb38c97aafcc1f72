// The extension module arbitrage_fast._C: the BlockPool (pybind11), the KV ops, a decoder layer's
// CPU ops (norm, RoPE, activation, paged attention, the whole packed layer) and the quantized linear ops over GGUF blocks, int3 blocks and bf16 weights (torch dispatcher, so they
// are called as torch.ops.arbitrage_fast.* and work under torch.compile and CUDA graph capture).
// This is the one place where things are registered.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <mutex>
#include <set>

#include "bf16_linear.h"
#include "block_pool.h"
#include "decoder_layer_cpu.h"
#include "greedy_logprob.h"
#include "decoder_ops.h"
#include "gguf_linear.h"
#include "int3_linear.h"
#include "kv_ops.h"
#include "paged_attention_cpu.h"

namespace py = pybind11;
using arbitrage_fast::BlockPool;

TORCH_LIBRARY(arbitrage_fast, m) {
  m.def("write_kv(Tensor(a!) cache, int layer, Tensor key, Tensor value, Tensor slots) -> ()");
  m.def("copy_pages(Tensor(a!) arena, Tensor src, Tensor dst) -> ()");
  m.def("gguf_linear(Tensor x, Tensor weight, int type, str isa='auto') -> Tensor");
  m.def("gguf_dequantize(Tensor weight, int type, int in_features) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight, str isa='auto') -> Tensor");
  m.def("int3_linear(Tensor x, Tensor weight, int group, str isa='auto') -> Tensor");
  m.def("int3_dequantize(Tensor weight, int group, int in_features) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope_write_kv(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) cache, int layer, "
        "Tensor slots) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("greedy_logprob(Tensor logits, bool entropy=False) -> (Tensor, Tensor, Tensor)");
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor cu_query_lens, "
        "Tensor seq_lens, float scale) -> Tensor");
  m.def("decoder_layer(Tensor h, Tensor? residual, Tensor input_norm, Tensor post_norm, float eps, "
        "Tensor[] qkv, int[] qkv_types, Tensor? qkv_bias, Tensor[] o, int[] o_types, Tensor? o_bias, "
        "Tensor[] gate_up, int[] gate_up_types, Tensor? gate_up_bias, Tensor[] down, int[] down_types, "
        "Tensor? down_bias, Tensor cos, Tensor sin, Tensor(a!) kv_cache, int layer, Tensor slots, "
        "Tensor block_tables, Tensor cu_query_lens, Tensor seq_lens, int num_heads, int num_kv_heads, "
        "float scale, int int3_group) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(arbitrage_fast, CPU, m) {
  m.impl("write_kv", &arbitrage_fast::write_kv_cpu);
  m.impl("copy_pages", &arbitrage_fast::copy_pages_cpu);
  m.impl("gguf_linear", &arbitrage_fast::gguf_linear_cpu);
  m.impl("gguf_dequantize", &arbitrage_fast::gguf_dequantize_cpu);
  m.impl("bf16_linear", &arbitrage_fast::bf16_linear_cpu);
  m.impl("int3_linear", &arbitrage_fast::int3_linear_cpu);
  m.impl("int3_dequantize", &arbitrage_fast::int3_dequantize_cpu);
  m.impl("add_rms_norm", &arbitrage_fast::add_rms_norm_cpu);
  m.impl("rope_write_kv", &arbitrage_fast::rope_write_kv_cpu);
  m.impl("silu_and_mul", &arbitrage_fast::silu_and_mul_cpu);
  m.impl("greedy_logprob", &arbitrage_fast::greedy_logprob_cpu);
  m.impl("paged_attention", &arbitrage_fast::paged_attention_cpu);
  m.impl("decoder_layer", &arbitrage_fast::decoder_layer_cpu);
}

// A layer whose linears oneDNN packed at load passes their opaque weights, whose dispatch key
// (MkldnnCPU) outranks the activations' CPU key: the same CPU function serves it.
TORCH_LIBRARY_IMPL(arbitrage_fast, MkldnnCPU, m) {
  m.impl("decoder_layer", &arbitrage_fast::decoder_layer_cpu);
}

// Shape-only tracing (torch.compile's fake tensors): both ops return nothing.
void write_kv_meta(const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&) {}
void copy_pages_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&) {}

TORCH_LIBRARY_IMPL(arbitrage_fast, Meta, m) {
  m.impl("write_kv", &write_kv_meta);
  m.impl("copy_pages", &copy_pages_meta);
  m.impl("gguf_linear", &arbitrage_fast::gguf_linear_meta);
  m.impl("gguf_dequantize", &arbitrage_fast::gguf_dequantize_meta);
  m.impl("bf16_linear", &arbitrage_fast::bf16_linear_meta);
  m.impl("int3_linear", &arbitrage_fast::int3_linear_meta);
  m.impl("int3_dequantize", &arbitrage_fast::int3_dequantize_meta);
  m.impl("add_rms_norm", &arbitrage_fast::add_rms_norm_meta);
  m.impl("rope_write_kv", &arbitrage_fast::rope_write_kv_meta);
  m.impl("greedy_logprob", &arbitrage_fast::greedy_logprob_meta);
  m.impl("silu_and_mul", &arbitrage_fast::silu_and_mul_meta);
  m.impl("paged_attention", &arbitrage_fast::paged_attention_meta);
}

#ifdef ARBITRAGE_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(arbitrage_fast, CUDA, m) {
  m.impl("write_kv", &arbitrage_fast::write_kv_cuda);
  m.impl("copy_pages", &arbitrage_fast::copy_pages_cuda);
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "arbitrage-fast native extension: paged KV block pool and KV ops";
#ifdef ARBITRAGE_FAST_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif

  // Exhaustion is a RuntimeError subclass the scheduler catches by name; an unknown sequence
  // is a KeyError, like a dict lookup; bad model or page indices keep pybind11's IndexError.
  py::register_exception<arbitrage_fast::KVCacheExhausted>(m, "KVCacheExhausted",
                                                           PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const arbitrage_fast::UnknownSequence& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    }
  });

  // How many threads a CPU kernel's at::parallel_for runs on in this build (1 where the module
  // was compiled without OpenMP, whatever torch.get_num_threads() says).
  m.def("kernel_threads", [] {
    std::mutex mu;
    std::set<int> seen;
    at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
      std::lock_guard<std::mutex> lock(mu);
      seen.insert(at::get_thread_num());
    });
    return static_cast<int64_t>(seen.size());
  }, "threads a CPU kernel's parallel loop runs on here");
  m.def("gguf_cpu_paths", &arbitrage_fast::gguf_cpu_paths,
        "The gguf_linear code paths this CPU runs, best first.");
  m.def("bf16_cpu_paths", &arbitrage_fast::bf16_cpu_paths,
        "The bf16_linear code paths this CPU runs, best first.");

  py::class_<BlockPool>(m, "BlockPool",
                        "Ref-counted page allocator with one block table per sequence and model.")
      .def(py::init<int64_t, std::vector<int64_t>>(), py::arg("num_pages"),
           py::arg("block_sizes"))
      .def("add_sequence", &BlockPool::add_sequence, py::arg("seq_id"))
      .def("has_sequence", &BlockPool::has_sequence, py::arg("seq_id"))
      .def("free_sequence", &BlockPool::free_sequence, py::arg("seq_id"))
      .def("sequence_ids", &BlockPool::sequence_ids)
      .def("num_tokens", &BlockPool::num_tokens, py::arg("seq_id"), py::arg("model"))
      .def("block_table", &BlockPool::block_table, py::arg("seq_id"), py::arg("model"))
      .def("pages_needed", &BlockPool::pages_needed, py::arg("seq_id"), py::arg("model"),
           py::arg("new_num_tokens"))
      .def("extend", &BlockPool::extend, py::arg("seq_id"), py::arg("model"),
           py::arg("new_num_tokens"))
      .def("truncate", &BlockPool::truncate, py::arg("seq_id"), py::arg("model"),
           py::arg("num_tokens"))
      .def("fork", &BlockPool::fork, py::arg("src_seq"), py::arg("dst_seq"))
      .def("share_prefix", &BlockPool::share_prefix, py::arg("src_seq"), py::arg("dst_seq"),
           py::arg("model"), py::arg("num_tokens"))
      .def("can_allocate", &BlockPool::can_allocate, py::arg("num_pages"))
      .def("refcount", &BlockPool::refcount, py::arg("page"))
      .def("free_list", &BlockPool::free_list)
      .def("stats",
           [](const BlockPool& pool) {
             const arbitrage_fast::PoolStats s = pool.stats();
             py::dict d;
             d["total_pages"] = s.total_pages;
             d["free_pages"] = s.free_pages;
             d["used_pages"] = s.used_pages;
             d["pages_per_model"] = s.pages_per_model;
             d["num_sequences"] = s.num_sequences;
             d["block_sizes"] = s.block_sizes;
             return d;
           })
      .def_property_readonly("num_pages", &BlockPool::num_pages)
      .def_property_readonly("num_models", &BlockPool::num_models)
      .def_property_readonly("num_free_pages", &BlockPool::num_free_pages)
      .def("__repr__", [](const BlockPool& pool) {
        return "BlockPool(num_pages=" + std::to_string(pool.num_pages()) +
               ", free=" + std::to_string(pool.num_free_pages()) +
               ", sequences=" + std::to_string(pool.stats().num_sequences) + ")";
      });
}
