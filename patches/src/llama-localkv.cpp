// Implementation of the flat C API declared in include/llama-localkv.h.
// Nothing here throws across the C boundary: every entry point checks its
// arguments and returns an error code, and those of the compressed cache run
// inside one guard (localkv_guard) that turns an exception into one.
#include "llama-localkv.h"

#include "llama-context.h"
#include "llama-ext.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache-compressed.h"
#include "llama-model.h"

#include <algorithm>
#include <exception>
#include <string>
#include <utility>
#include <vector>

int32_t llama_localkv_abi_version(void) {
    return LLAMA_LOCALKV_ABI_VERSION;
}

// the plain KV caches behind a context's memory, in a fixed order (base before SWA)
static std::vector<llama_kv_cache *> localkv_kv_caches(const llama_context * ctx) {
    std::vector<llama_kv_cache *> res;
    if (!ctx) {
        return res;
    }
    llama_memory_i * mem = ctx->get_memory();
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        res.push_back(kv);
    } else if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        res.push_back(iswa->get_base());
        res.push_back(iswa->get_swa());
    }
    return res;
}

// the context's compressed cache, or nullptr
static llama_kv_cache_compressed * localkv_compressed_of(const llama_context * ctx) {
    return ctx ? dynamic_cast<llama_kv_cache_compressed *>(ctx->get_memory()) : nullptr;
}

// one kind of the context's buffers (llama_memory_breakdown_data::context or ::compute), summed over all backends
static int64_t localkv_breakdown_bytes(const llama_context * ctx, size_t llama_memory_breakdown_data::* kind) {
    if (!ctx) {
        return -1;
    }
    int64_t total = 0;
    for (const auto & [buft, data] : llama_get_memory_breakdown(ctx)) {
        (void) buft;
        total += (int64_t) (data.*kind);
    }
    return total;
}

int64_t llama_localkv_memory_bytes(const llama_context * ctx) {
    return localkv_breakdown_bytes(ctx, &llama_memory_breakdown_data::context);
}

int64_t llama_localkv_compute_bytes(const llama_context * ctx) {
    return localkv_breakdown_bytes(ctx, &llama_memory_breakdown_data::compute);
}

int32_t llama_localkv_n_kv_layers(const llama_context * ctx) {
    if (const auto * kv = localkv_compressed_of(ctx)) {
        return (int32_t) kv->get_layers().size();
    }
    const auto caches = localkv_kv_caches(ctx);
    if (caches.empty()) {
        return -1;
    }
    int32_t n = 0;
    for (const auto * kv : caches) {
        n += (int32_t) kv->get_layer_ids().size();
    }
    return n;
}

int32_t llama_localkv_kv_layer_info(const llama_context * ctx, int32_t i, int32_t * il, int32_t * n_head_kv,
        size_t * k_bytes, size_t * v_bytes) {
    auto out = [&](int32_t layer, const ggml_tensor * k, const ggml_tensor * v) {
        if (il)        { *il        = layer; }
        if (n_head_kv) { *n_head_kv = (int32_t) ctx->get_model().hparams.n_head_kv(layer); }
        if (k_bytes)   { *k_bytes   = k ? ggml_nbytes(k) : 0; }
        if (v_bytes)   { *v_bytes   = v ? ggml_nbytes(v) : 0; }
        return 0;
    };
    if (const auto * kv = localkv_compressed_of(ctx)) {
        const auto & layers = kv->get_layers();
        if (i < 0 || (size_t) i >= layers.size()) {
            return -2;
        }
        return out(layers[i].il, layers[i].k, layers[i].v);
    }
    const auto caches = localkv_kv_caches(ctx);
    if (caches.empty()) {
        return -1;
    }
    if (i < 0) {
        return -2;
    }
    for (const auto * kv : caches) {
        const auto ids = kv->get_layer_ids();
        if ((size_t) i >= ids.size()) {
            i -= (int32_t) ids.size();
            continue;
        }
        const int32_t layer = (int32_t) ids[i];
        return out(layer, kv->get_k_storage(layer), kv->get_v_storage(layer));
    }
    return -2;
}

// the cache of a sliding-window model's windowed layers: the compressed cache's, else upstream's SWA cache
static const llama_kv_cache * localkv_windowed_of(const llama_context * ctx) {
    if (!ctx) {
        return nullptr;
    }
    if (const auto * kv = localkv_compressed_of(ctx)) {
        return kv->get_windowed();
    }
    const auto * iswa = dynamic_cast<const llama_kv_cache_iswa *>(ctx->get_memory());
    return iswa ? iswa->get_swa() : nullptr;
}

int32_t llama_localkv_n_windowed_layers(const llama_context * ctx) {
    if (!ctx) {
        return -1;
    }
    const llama_kv_cache * swa = localkv_windowed_of(ctx);
    return swa ? (int32_t) swa->get_layer_ids().size() : 0;
}

int32_t llama_localkv_windowed_layer_info(const llama_context * ctx, int32_t i, int32_t * il, uint32_t * n_cells,
        size_t * k_bytes, size_t * v_bytes) {
    if (!ctx) {
        return -1;
    }
    const llama_kv_cache * swa = localkv_windowed_of(ctx);
    const std::vector<uint32_t> ids = swa ? swa->get_layer_ids() : std::vector<uint32_t>();
    if (i < 0 || (size_t) i >= ids.size()) {
        return -2;
    }
    const int32_t layer = (int32_t) ids[i];
    const ggml_tensor * k = swa->get_k_storage(layer);
    const ggml_tensor * v = swa->get_v_storage(layer);
    if (il)      { *il      = layer; }
    if (n_cells) { *n_cells = swa->get_size(); }
    if (k_bytes) { *k_bytes = k ? ggml_nbytes(k) : 0; }
    if (v_bytes) { *v_bytes = v ? ggml_nbytes(v) : 0; }
    return 0;
}

//
// compressed KV cache: every entry point runs inside localkv_guard, so nothing throws across the C boundary
//

static thread_local std::string localkv_error;

const char * llama_localkv_last_error(void) {
    return localkv_error.c_str();
}

static int32_t localkv_fail(int32_t code, const std::string & msg) {
    localkv_error = msg;
    return code;
}

// a status from the cache: returned as is unless it is an error, which records `err`
static int32_t localkv_result(int32_t rc, const std::string & err) {
    return rc >= 0 ? rc : localkv_fail(rc, err);
}

// what `body` returns; an exception becomes the error code `on_throw`, with its message recorded
template <typename F>
static auto localkv_guard(int32_t on_throw, F && body) -> decltype(body()) {
    try {
        return body();
    } catch (const std::exception & e) {
        return localkv_fail(on_throw, e.what());
    }
}

// what `body` returns for the context's compressed cache, inside localkv_guard; an error code when ctx is NULL or
// has no compressed cache
template <typename F>
static auto localkv_with_cache(const llama_context * ctx, int32_t on_throw, F && body)
        -> decltype(body(std::declval<llama_kv_cache_compressed &>())) {
    using result = decltype(body(std::declval<llama_kv_cache_compressed &>()));
    return localkv_guard(on_throw, [&]() -> result {
        if (!ctx) {
            return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "ctx is NULL");
        }
        llama_kv_cache_compressed * kv = localkv_compressed_of(ctx);
        if (!kv) {
            return localkv_fail(LLAMA_LOCALKV_ERR_STATE, "compressed storage is not enabled on this context");
        }
        return body(*kv);
    });
}

// run the pending compactions (on the cache's own scheduler) before anything reads or reshapes the device buffers
static void localkv_flush(llama_context * ctx, llama_kv_cache_compressed & kv) {
    ctx->synchronize();
    kv.flush();
}

// localkv_with_cache for a call that reads or reshapes the device: the pending compactions run first, and `body`
// returns a status, setting `err` on failure
template <typename F>
static int32_t localkv_call_flushed(llama_context * ctx, int32_t on_throw, F && body) {
    return localkv_with_cache(ctx, on_throw, [&](llama_kv_cache_compressed & kv) {
        localkv_flush(ctx, kv);
        std::string err;
        const int32_t rc = body(kv, err);
        return localkv_result(rc, err);
    });
}

// why the context's memory cannot be replaced by a compressed cache ("" when it can)
static std::string localkv_why_not(const llama_context * ctx) {
    const llama_model   & model   = ctx->get_model();
    const llama_hparams & hparams = model.hparams;
    if (ctx->n_seq_max() != 1 || ctx->get_cparams().ctx_other != nullptr) {
        return "compressed storage needs a context with one sequence (n_seq_max = 1) and its own cache";
    }
    const bool two_caches = dynamic_cast<const llama_kv_cache_iswa *>(ctx->get_memory()) != nullptr;
    if (hparams.swa_type != LLAMA_SWA_TYPE_NONE && !two_caches) {
        // a window over every layer in one cache (Mistral 7B v0.1's): nothing full-attention to compress
        return "compressed storage does not support a sliding window over every layer (only models that mix windowed and "
               "full-attention layers)";
    }
    if (hparams.is_mla() || hparams.n_pos_per_embd() > 1) {
        return "compressed storage does not support this model's attention (MLA or multi-position RoPE)";
    }
    if (hparams.n_layer_kv_from_start >= 0) {
        return "compressed storage does not support layers that share another layer's K and V";
    }
    if (llama_model_has_encoder(&model) || !ctx->get_cparams().causal_attn) {
        return "compressed storage needs a causal decoder-only model";
    }
    if (model.split_mode() == LLAMA_SPLIT_MODE_TENSOR) {
        // that mode splits every cache tensor across devices along its rows, by KV head; a compressed row is one head
        return "compressed storage does not support tensor split mode (LLAMA_SPLIT_MODE_TENSOR): split by layer";
    }
    return "";
}

// a sliding-window model's windowed layers in an upstream cache of their own, made as llama_kv_cache_iswa makes its
// SWA cache (the same layers, types and devices, the model's window) but sized for the window and one ubatch
// whatever the context's size: a compressed context is created small, its positions are not bounded by it
static std::unique_ptr<llama_kv_cache> localkv_windowed_cache(const llama_context * ctx, const llama_kv_cache & swa) {
    const llama_model   & model   = ctx->get_model();
    const llama_hparams & hparams = model.hparams;
    const llama_cparams & cparams = ctx->get_cparams();
    const std::vector<uint32_t> ids = swa.get_layer_ids();
    GGML_ASSERT(!ids.empty());
    const ggml_type type_k = swa.get_k_storage(ids[0])->type;
    const ggml_type type_v = swa.get_v_storage(ids[0])->type;
    const uint32_t size = GGML_PAD(hparams.n_swa + cparams.n_ubatch, 256); // upstream pads its SWA cache to 256
    const llama_memory_i::layer_filter_cb filter = [ids](int32_t il) {
        return std::find(ids.begin(), ids.end(), (uint32_t) il) != ids.end();
    };
    return std::make_unique<llama_kv_cache>(model, hparams, type_k, type_v, !cparams.flash_attn, cparams.offload_kqv,
            cparams.kv_unified, size, 1, 1, hparams.n_swa, hparams.swa_type, nullptr, filter, nullptr, nullptr);
}

int32_t llama_localkv_enable(llama_context * ctx, const uint32_t * capacities, const uint32_t * slots, int32_t n_heads) {
    return localkv_guard(LLAMA_LOCALKV_ERR_ALLOC, [&]() -> int32_t {
        if (!ctx) {
            return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "ctx is NULL");
        }
        if (localkv_compressed_of(ctx)) {
            return localkv_fail(LLAMA_LOCALKV_ERR_STATE, "compressed storage is already enabled on this context");
        }
        // a plain cache, or a sliding-window model's two (its full-attention layers are compressed)
        llama_memory_i * mem = ctx->get_memory();
        auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem);
        const llama_kv_cache * kv = iswa ? iswa->get_base() : dynamic_cast<llama_kv_cache *>(mem);
        if (!kv) {
            return localkv_fail(LLAMA_LOCALKV_ERR_UNSUPPORTED,
                    "this model's memory is not a KV cache (recurrent and hybrid recurrent models cannot be compressed)");
        }
        const std::string why = localkv_why_not(ctx);
        if (!why.empty()) {
            return localkv_fail(LLAMA_LOCALKV_ERR_UNSUPPORTED, why);
        }
        if (mem->seq_pos_max(0) >= 0) {
            return localkv_fail(LLAMA_LOCALKV_ERR_STATE, "compressed storage must be enabled on an empty cache");
        }
        if (kv->get_layer_ids().empty()) {
            return localkv_fail(LLAMA_LOCALKV_ERR_UNSUPPORTED, "this model has no full-attention layer to compress");
        }
        ctx->synchronize();
        int32_t rc = LLAMA_LOCALKV_OK;
        std::string err;
        // built in full beside the plain cache, so a failure leaves the context as it was
        auto compressed = llama_kv_cache_compressed::create(ctx->get_model(), *kv, capacities, slots, n_heads, rc, err);
        if (!compressed) {
            return localkv_fail(rc, err);
        }
        if (iswa) {
            compressed->set_windowed(localkv_windowed_cache(ctx, *iswa->get_swa()));
        }
        compressed->attach(ctx);
        ctx->swap_memory(std::move(compressed)); // the plain caches' buffers are freed here
        return LLAMA_LOCALKV_OK;
    });
}

int32_t llama_localkv_resize(llama_context * ctx, const uint32_t * capacities, const uint32_t * slots, int32_t n_heads) {
    return localkv_call_flushed(ctx, LLAMA_LOCALKV_ERR_ALLOC, [&](llama_kv_cache_compressed & kv, std::string & err) {
        return kv.resize(capacities, slots, n_heads, err);
    });
}

int32_t llama_localkv_enabled(const llama_context * ctx) {
    if (!ctx) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "ctx is NULL");
    }
    return localkv_compressed_of(ctx) ? 1 : 0;
}

int32_t llama_localkv_set_stats(llama_context * ctx, uint32_t flags, uint32_t window) {
    return localkv_with_cache(ctx, LLAMA_LOCALKV_ERR_ALLOC, [&](llama_kv_cache_compressed & kv) -> int32_t {
        const bool query_heads = flags & LLAMA_LOCALKV_STATS_QUERY_HEADS;
        const uint32_t stats   = flags & ~LLAMA_LOCALKV_STATS_QUERY_HEADS;
        if (stats >= (1u << LLAMA_LOCALKV_STAT_COUNT)) {
            return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "unknown statistic in flags " + std::to_string(stats));
        }
        if (window == 0 || window > 1u << 16) {
            return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "observation window " + std::to_string(window) + " is out of range");
        }
        localkv_flush(ctx, kv);
        std::string err;
        return localkv_result(kv.set_stats(stats, window, query_heads, err), err);
    });
}

int32_t llama_localkv_set_scorer(llama_context * ctx, int32_t i, int32_t n_in, int32_t n_hidden, const float * w1,
        const float * b1, const float * w2, const float * b2) {
    return localkv_call_flushed(ctx, LLAMA_LOCALKV_ERR_ARG, [&](llama_kv_cache_compressed & kv, std::string & err) {
        return kv.set_scorer(i, n_in, n_hidden, w1, b1, w2, b2, err);
    });
}

int32_t llama_localkv_clear_stat(llama_context * ctx, int32_t stat) {
    return localkv_call_flushed(ctx, LLAMA_LOCALKV_ERR_ARG, [&](llama_kv_cache_compressed & kv, std::string & err) {
        return kv.clear_stat(stat, err);
    });
}

int32_t llama_localkv_set_hidden(llama_context * ctx, int32_t p0, int32_t p1) {
    return localkv_with_cache(ctx, LLAMA_LOCALKV_ERR_ARG, [&](llama_kv_cache_compressed & kv) -> int32_t {
        if (p0 < 0 || p1 < 0) {
            return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "hidden positions [" + std::to_string(p0) + ", " + std::to_string(p1) +
                    ") must not be negative");
        }
        if (p0 < p1 && kv.pod_recent() > 0) {
            return localkv_fail(LLAMA_LOCALKV_ERR_STATE, "positions cannot be hidden while POD is on");
        }
        kv.set_hidden(p0, p1);
        return LLAMA_LOCALKV_OK;
    });
}

int32_t llama_localkv_set_replay(llama_context * ctx, int32_t on) {
    return localkv_with_cache(ctx, LLAMA_LOCALKV_ERR_ALLOC, [&](llama_kv_cache_compressed & kv) -> int32_t {
        localkv_flush(ctx, kv); // the windowed cache is saved or restored: nothing may still be writing to it
        kv.set_replay(on != 0);
        return LLAMA_LOCALKV_OK;
    });
}

int32_t llama_localkv_set_pod(llama_context * ctx, const int32_t * leader, int32_t n_heads, uint32_t n_sink, uint32_t n_recent) {
    return localkv_call_flushed(ctx, LLAMA_LOCALKV_ERR_ALLOC, [&](llama_kv_cache_compressed & kv, std::string & err) {
        const int32_t rc = kv.set_pod(leader, n_heads, n_sink, n_recent, err);
        if (rc == LLAMA_LOCALKV_OK) {
            ctx->swap_memory(ctx->swap_memory(nullptr)); // graphs built before point to the old buffers
        }
        return rc;
    });
}

// an error unless output arrays of n entries (any of them NULL when `any` is false) hold one per KV head
static int32_t localkv_check_per_head(const llama_kv_cache_compressed & kv, bool any, size_t n) {
    const size_t n_heads = kv.n_heads_total();
    if (any && n < n_heads) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "output arrays too small: need " + std::to_string(n_heads));
    }
    return (int32_t) n_heads;
}

int32_t llama_localkv_pod_state(const llama_context * ctx, int32_t * leader, uint32_t * k_slots, uint32_t * n_sink,
        uint32_t * first_recent, size_t n) {
    return localkv_with_cache(ctx, LLAMA_LOCALKV_ERR_ARG, [&](llama_kv_cache_compressed & kv) {
        const int32_t n_heads = localkv_check_per_head(kv, leader || k_slots || n_sink || first_recent, n);
        if (n_heads < 0) {
            return n_heads;
        }
        size_t k = 0;
        for (const auto & layer : kv.get_layers()) {
            for (uint32_t h = 0; h < layer.n_head_kv; ++h, ++k) {
                uint32_t s = 0, r = 0;
                kv.pod_proximal(layer, h, s, r);
                if (leader)       { leader[k]       = layer.leader[h]; }
                if (k_slots)      { k_slots[k]      = layer.k_alloc[h]; }
                if (n_sink)       { n_sink[k]       = s; }
                if (first_recent) { first_recent[k] = r; }
            }
        }
        return n_heads;
    });
}

int32_t llama_localkv_cache_state(const llama_context * ctx, uint32_t * capacity, uint32_t * n_alloc, uint32_t * n_used, size_t n) {
    return localkv_with_cache(ctx, LLAMA_LOCALKV_ERR_ARG, [&](llama_kv_cache_compressed & kv) {
        const int32_t n_heads = localkv_check_per_head(kv, capacity || n_alloc || n_used, n);
        if (n_heads < 0) {
            return n_heads;
        }
        size_t k = 0;
        for (const auto & layer : kv.get_layers()) {
            for (uint32_t h = 0; h < layer.n_head_kv; ++h, ++k) {
                if (capacity) { capacity[k] = layer.capacity[h]; }
                if (n_alloc)  { n_alloc[k]  = layer.alloc[h]; }
                if (n_used)   { n_used[k]   = layer.n_used[h]; }
            }
        }
        return n_heads;
    });
}

int32_t llama_localkv_get_positions(const llama_context * ctx, int32_t i, int32_t * out, size_t n_out) {
    return localkv_with_cache(ctx, LLAMA_LOCALKV_ERR_ARG, [&](llama_kv_cache_compressed & kv) -> int32_t {
        const auto & layers = kv.get_layers();
        if (i < 0 || i >= (int32_t) layers.size()) {
            return localkv_fail(LLAMA_LOCALKV_ERR_LAYER, "no cached layer " + std::to_string(i));
        }
        const auto & layer = layers[i];
        const size_t n = layer.used_total();
        if ((!out && n > 0) || n_out < n) {
            return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "output buffer too small: need " + std::to_string(n));
        }
        size_t k = 0;
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            for (uint32_t s = 0; s < layer.n_used[h]; ++s) {
                out[k++] = layer.pos[layer.base[h] + s];
            }
        }
        return (int32_t) n;
    });
}

int32_t llama_localkv_get_stat(llama_context * ctx, int32_t i, int32_t stat, bool sum_per_kv_head, float * out, size_t n_out) {
    return localkv_call_flushed(ctx, LLAMA_LOCALKV_ERR_ARG, [&](llama_kv_cache_compressed & kv, std::string & err) {
        return kv.get_stat(i, stat, sum_per_kv_head, out, n_out, err);
    });
}

int64_t llama_localkv_get_stats(llama_context * ctx, int32_t stat, bool sum_per_kv_head, float * out, size_t n_out) {
    return localkv_with_cache(ctx, LLAMA_LOCALKV_ERR_ARG, [&](llama_kv_cache_compressed & kv) -> int64_t {
        localkv_flush(ctx, kv);
        std::string err;
        const int64_t n = kv.get_stats(stat, sum_per_kv_head, out, n_out, err);
        return n >= 0 ? n : (int64_t) localkv_fail((int32_t) n, err);
    });
}

int32_t llama_localkv_keep(llama_context * ctx, int32_t i, const int32_t * slots, const int32_t * n_keep) {
    return localkv_with_cache(ctx, LLAMA_LOCALKV_ERR_ARG, [&](llama_kv_cache_compressed & kv) {
        std::string err;
        return localkv_result(kv.keep(i, slots, n_keep, err), err);
    });
}

int64_t llama_localkv_stats_bytes(const llama_context * ctx) {
    return localkv_with_cache(ctx, LLAMA_LOCALKV_ERR_ARG, [](llama_kv_cache_compressed & kv) {
        return (int64_t) kv.stats_bytes();
    });
}

int64_t llama_localkv_transfer_bytes(const llama_context * ctx) {
    return localkv_with_cache(ctx, LLAMA_LOCALKV_ERR_ARG, [](llama_kv_cache_compressed & kv) {
        return (int64_t) kv.get_transfer_bytes();
    });
}

int64_t llama_localkv_transfers(const llama_context * ctx) {
    return localkv_with_cache(ctx, LLAMA_LOCALKV_ERR_ARG, [](llama_kv_cache_compressed & kv) {
        return (int64_t) kv.get_transfers();
    });
}

int32_t llama_localkv_read_rows(llama_context * ctx, int32_t i, int32_t which, void * out, size_t n_out) {
    return localkv_call_flushed(ctx, LLAMA_LOCALKV_ERR_ARG, [&](llama_kv_cache_compressed & kv, std::string & err) {
        return kv.read_rows(i, which, out, n_out, err);
    });
}
