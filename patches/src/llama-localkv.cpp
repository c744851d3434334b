// Implementation of the flat C API declared in include/llama-localkv.h.
// Nothing here throws across the C boundary: every entry point checks its
// arguments and returns an error code.
#include "llama-localkv.h"

#include "llama-context.h"
#include "llama-ext.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-compress.h"
#include "llama-model.h"

#include <string>
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
static llama_kv_cache_cmp * localkv_cmp_of(const llama_context * ctx) {
    return ctx ? dynamic_cast<llama_kv_cache_cmp *>(ctx->get_memory()) : nullptr;
}

int64_t llama_localkv_memory_bytes(const llama_context * ctx) {
    if (!ctx) {
        return -1;
    }
    int64_t total = 0;
    for (const auto & [buft, data] : llama_get_memory_breakdown(ctx)) {
        (void) buft;
        total += (int64_t) data.context;
    }
    return total;
}

int64_t llama_localkv_compute_bytes(const llama_context * ctx) {
    if (!ctx) {
        return -1;
    }
    int64_t total = 0;
    for (const auto & [buft, data] : llama_get_memory_breakdown(ctx)) {
        (void) buft;
        total += (int64_t) data.compute;
    }
    return total;
}

int32_t llama_localkv_n_kv_layers(const llama_context * ctx) {
    if (const auto * cmp = localkv_cmp_of(ctx)) {
        return (int32_t) cmp->get_layers().size();
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
    if (const auto * cmp = localkv_cmp_of(ctx)) {
        const auto & layers = cmp->get_layers();
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

//
// compressed KV cache
//

static thread_local std::string localkv_error;

const char * llama_localkv_last_error(void) {
    return localkv_error.c_str();
}

static int32_t localkv_fail(int32_t code, const std::string & msg) {
    localkv_error = msg;
    return code;
}

// the context's compressed cache, or nullptr with the error recorded in `code`
static llama_kv_cache_cmp * localkv_cmp_cache(const llama_context * ctx, int32_t & code) {
    if (!ctx) {
        code = localkv_fail(LLAMA_LOCALKV_ERR_ARG, "ctx is NULL");
        return nullptr;
    }
    llama_kv_cache_cmp * kv = localkv_cmp_of(ctx);
    if (!kv) {
        code = localkv_fail(LLAMA_LOCALKV_ERR_STATE, "compressed storage is not enabled on this context");
        return nullptr;
    }
    return kv;
}

// run the pending compactions (through the context's memory update, which also stops the previous
// decode graph from being reused) before anything reads or reshapes the device buffers
static void localkv_flush(llama_context * ctx, llama_kv_cache_cmp * kv) {
    if (kv->has_pending()) {
        ctx->synchronize();
        ctx->memory_update(false);
    }
    ctx->synchronize();
}

// why the context's memory cannot be replaced by a compressed cache ("" when it can)
static std::string localkv_why_not(const llama_context * ctx) {
    const llama_model   & model   = ctx->get_model();
    const llama_hparams & hparams = model.hparams;
    if (ctx->n_seq_max() != 1 || ctx->get_cparams().ctx_other != nullptr) {
        return "compressed storage needs a context with one sequence (n_seq_max = 1) and its own cache";
    }
    if (hparams.swa_type != LLAMA_SWA_TYPE_NONE || hparams.is_mla() || hparams.n_pos_per_embd() > 1) {
        return "compressed storage does not support this model's attention (sliding window, MLA or multi-position RoPE)";
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

int32_t llama_localkv_enable(llama_context * ctx, const uint32_t * capacities, const uint32_t * slots, int32_t n_heads) {
    if (!ctx) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "ctx is NULL");
    }
    if (localkv_cmp_of(ctx)) {
        return localkv_fail(LLAMA_LOCALKV_ERR_STATE, "compressed storage is already enabled on this context");
    }
    auto * kv = dynamic_cast<llama_kv_cache *>(ctx->get_memory());
    if (!kv) {
        return localkv_fail(LLAMA_LOCALKV_ERR_UNSUPPORTED,
                "this model's memory is not a plain KV cache (sliding-window, recurrent or hybrid models cannot be compressed)");
    }
    const std::string why = localkv_why_not(ctx);
    if (!why.empty()) {
        return localkv_fail(LLAMA_LOCALKV_ERR_UNSUPPORTED, why);
    }
    if (kv->seq_pos_max(0) >= 0) {
        return localkv_fail(LLAMA_LOCALKV_ERR_STATE, "compressed storage must be enabled on an empty cache");
    }
    try {
        ctx->synchronize();
        int32_t rc = LLAMA_LOCALKV_OK;
        std::string err;
        // built in full beside the plain cache, so a failure leaves the context as it was
        auto cmp = llama_kv_cache_cmp::create(ctx->get_model(), *kv, capacities, slots, n_heads, rc, err);
        if (!cmp) {
            return localkv_fail(rc, err);
        }
        ctx->swap_memory(std::move(cmp)); // the plain cache's buffers are freed here
        return LLAMA_LOCALKV_OK;
    } catch (const std::exception & e) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ALLOC, e.what());
    }
}

int32_t llama_localkv_resize(llama_context * ctx, const uint32_t * capacities, const uint32_t * slots, int32_t n_heads) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    try {
        localkv_flush(ctx, kv);
        std::string err;
        const int32_t rc = kv->resize(capacities, slots, n_heads, err);
        return rc == LLAMA_LOCALKV_OK ? rc : localkv_fail(rc, err);
    } catch (const std::exception & e) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ALLOC, e.what());
    }
}

int32_t llama_localkv_enabled(const llama_context * ctx) {
    if (!ctx) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "ctx is NULL");
    }
    return localkv_cmp_of(ctx) ? 1 : 0;
}

int32_t llama_localkv_set_stats(llama_context * ctx, uint32_t flags, uint32_t window) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    const bool query_heads = flags & LLAMA_LOCALKV_STATS_QUERY_HEADS;
    flags &= ~LLAMA_LOCALKV_STATS_QUERY_HEADS;
    if (flags >= (1u << LLAMA_LOCALKV_STAT_COUNT)) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "unknown statistic in flags " + std::to_string(flags));
    }
    if (window == 0 || window > 1u << 16) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "observation window " + std::to_string(window) + " is out of range");
    }
    try {
        localkv_flush(ctx, kv);
        std::string err;
        const int32_t rc = kv->set_stats(flags, window, query_heads, err);
        return rc == LLAMA_LOCALKV_OK ? rc : localkv_fail(rc, err);
    } catch (const std::exception & e) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ALLOC, e.what());
    }
}

int32_t llama_localkv_clear_stat(llama_context * ctx, int32_t stat) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    try {
        localkv_flush(ctx, kv);
        std::string err;
        const int32_t rc = kv->clear_stat(stat, err);
        return rc == LLAMA_LOCALKV_OK ? rc : localkv_fail(rc, err);
    } catch (const std::exception & e) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, e.what());
    }
}

int32_t llama_localkv_set_hidden(llama_context * ctx, int32_t p0, int32_t p1) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    if (p0 < 0 || p1 < 0) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "hidden positions [" + std::to_string(p0) + ", " + std::to_string(p1) +
                ") must not be negative");
    }
    if (p0 < p1 && kv->pod_recent() > 0) {
        return localkv_fail(LLAMA_LOCALKV_ERR_STATE, "positions cannot be hidden while POD is on");
    }
    kv->set_hidden(p0, p1);
    return LLAMA_LOCALKV_OK;
}

int32_t llama_localkv_set_pod(llama_context * ctx, const int32_t * leader, int32_t n_heads, uint32_t n_sink, uint32_t n_recent) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    try {
        localkv_flush(ctx, kv);
        std::string err;
        const int32_t rc = kv->set_pod(leader, n_heads, n_sink, n_recent, err);
        if (rc == LLAMA_LOCALKV_OK) {
            ctx->swap_memory(ctx->swap_memory(nullptr)); // graphs built before point to the old buffers
        }
        return rc == LLAMA_LOCALKV_OK ? rc : localkv_fail(rc, err);
    } catch (const std::exception & e) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ALLOC, e.what());
    }
}

int32_t llama_localkv_pod_state(const llama_context * ctx, int32_t * leader, uint32_t * k_slots, uint32_t * n_sink,
        uint32_t * first_recent, size_t n) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    const size_t n_heads = kv->n_heads_total();
    if ((leader || k_slots || n_sink || first_recent) && n < n_heads) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "output arrays too small: need " + std::to_string(n_heads));
    }
    size_t k = 0;
    for (const auto & cl : kv->get_layers()) {
        for (uint32_t h = 0; h < cl.n_head_kv; ++h, ++k) {
            uint32_t s = 0, r = 0;
            kv->pod_proximal(cl, h, s, r);
            if (leader)       { leader[k]       = cl.leader[h]; }
            if (k_slots)      { k_slots[k]      = cl.kalloc[h]; }
            if (n_sink)       { n_sink[k]       = s; }
            if (first_recent) { first_recent[k] = r; }
        }
    }
    return (int32_t) n_heads;
}

int32_t llama_localkv_cache_state(const llama_context * ctx, uint32_t * capacity, uint32_t * n_alloc, uint32_t * n_used, size_t n) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    const size_t n_heads = kv->n_heads_total();
    if ((capacity || n_alloc || n_used) && n < n_heads) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "output arrays too small: need " + std::to_string(n_heads));
    }
    size_t k = 0;
    for (const auto & cl : kv->get_layers()) {
        for (uint32_t h = 0; h < cl.n_head_kv; ++h, ++k) {
            if (capacity) { capacity[k] = cl.cap[h]; }
            if (n_alloc)  { n_alloc[k]  = cl.alloc[h]; }
            if (n_used)   { n_used[k]   = cl.n_used[h]; }
        }
    }
    return (int32_t) n_heads;
}

int32_t llama_localkv_get_positions(const llama_context * ctx, int32_t i, int32_t * out, size_t n_out) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    const auto & layers = kv->get_layers();
    if (i < 0 || i >= (int32_t) layers.size()) {
        return localkv_fail(LLAMA_LOCALKV_ERR_LAYER, "no cached layer " + std::to_string(i));
    }
    const auto & cl = layers[i];
    const size_t n = cl.used_total();
    if ((!out && n > 0) || n_out < n) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, "output buffer too small: need " + std::to_string(n));
    }
    size_t k = 0;
    for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
        for (uint32_t s = 0; s < cl.n_used[h]; ++s) {
            out[k++] = cl.pos[cl.base[h] + s];
        }
    }
    return (int32_t) n;
}

int32_t llama_localkv_get_stat(llama_context * ctx, int32_t i, int32_t stat, bool sum_per_kv_head, float * out, size_t n_out) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    try {
        localkv_flush(ctx, kv);
        std::string err;
        const int32_t rc = kv->get_stat(i, stat, sum_per_kv_head, out, n_out, err);
        return rc >= 0 ? rc : localkv_fail(rc, err);
    } catch (const std::exception & e) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, e.what());
    }
}

int32_t llama_localkv_keep(llama_context * ctx, int32_t i, const int32_t * slots, const int32_t * n_keep) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    try {
        std::string err;
        const int32_t rc = kv->keep(i, slots, n_keep, err);
        return rc == LLAMA_LOCALKV_OK ? rc : localkv_fail(rc, err);
    } catch (const std::exception & e) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, e.what());
    }
}

int64_t llama_localkv_stats_bytes(const llama_context * ctx) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    return (int64_t) kv->stats_bytes();
}

int64_t llama_localkv_transfer_bytes(const llama_context * ctx) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    return (int64_t) kv->get_transfer_bytes();
}

int32_t llama_localkv_read_rows(llama_context * ctx, int32_t i, int32_t which, void * out, size_t n_out) {
    int32_t code = 0;
    llama_kv_cache_cmp * kv = localkv_cmp_cache(ctx, code);
    if (!kv) {
        return code;
    }
    try {
        localkv_flush(ctx, kv);
        std::string err;
        const int32_t rc = kv->read_rows(i, which, out, n_out, err);
        return rc >= 0 ? rc : localkv_fail(rc, err);
    } catch (const std::exception & e) {
        return localkv_fail(LLAMA_LOCALKV_ERR_ARG, e.what());
    }
}
