// localkv compressed KV cache, storage: creating the cache beside upstream's, allocating its K/V and statistics
// buffers per (layer, KV head) region, and reallocating them (resize, a statistic switched on) with the tokens kept.

#include "llama-kv-cache-compressed.h"

#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>

// a new value for every storage change of any compressed cache (see llama_kv_cache_compressed::epoch)
uint32_t llama_kv_compressed_next_epoch() {
    static std::atomic<uint32_t> epoch{0};
    return ++epoch;
}

//
// creation
//

// the Hadamard rotation `tmpl` applies to K (v = false) or V, copied to the host (empty when it applies none):
// asked through upstream's own input API, so a compressed cache rotates exactly as the plain one would
static std::vector<float> rotation_of(const llama_kv_cache & tmpl, bool v) {
    ggml_context_ptr ctx(llama_kv_compressed_meta_ctx(1));
    ggml_tensor * t = v ? tmpl.build_input_v_rot(ctx.get()) : tmpl.build_input_k_rot(ctx.get());
    if (!t) {
        return {};
    }
    ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), ggml_backend_cpu_buffer_type()));
    if (!buf) {
        throw std::runtime_error("failed to copy the KV rotation");
    }
    if (v) {
        tmpl.set_input_v_rot(t);
    } else {
        tmpl.set_input_k_rot(t);
    }
    std::vector<float> data(ggml_nelements(t));
    ggml_backend_tensor_get(t, data.data(), 0, ggml_nbytes(t));
    return data;
}

// whether the device of a buffer type runs an F32 out_prod (the CPU and CUDA backends do, Metal does not)
static bool runs_out_prod(ggml_backend_buffer_type_t buft) {
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (!dev && ggml_backend_buft_is_host(buft)) {
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU); // ggml's CPU buffer type names no device
    }
    if (!dev) {
        return false;
    }
    ggml_context_ptr ctx(llama_kv_compressed_meta_ctx(3));
    ggml_tensor * a = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, 64, 8, 2);
    ggml_tensor * b = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, 1, 8, 2);
    return ggml_backend_dev_supports_op(dev, ggml_out_prod(ctx.get(), a, b));
}

// the multiple of slots per head: DEVICE_PAD when some layer lives off the host (a GPU), else ALLOC_PAD; the
// environment's LLAMA_LOCALKV_SLOT_PAD (a multiple of 32) overrides it, to measure one against the other
static uint32_t slot_pad_for(const std::vector<llama_kv_compressed_layer> & layers) {
    if (const char * env = getenv("LLAMA_LOCALKV_SLOT_PAD")) {
        const long pad = strtol(env, nullptr, 10);
        if (pad >= 32 && pad <= 4096 && pad % 32 == 0) {
            return (uint32_t) pad;
        }
        LLAMA_LOG_WARN("%s: LLAMA_LOCALKV_SLOT_PAD=%s is not a multiple of 32 in [32, 4096], ignored\n", __func__, env);
    }
    for (const auto & layer : layers) {
        if (!ggml_backend_buft_is_host(layer.buft)) {
            return llama_kv_cache_compressed::DEVICE_PAD;
        }
    }
    return llama_kv_cache_compressed::ALLOC_PAD;
}

// why model layer il cannot be stored compressed ("" when it can)
static std::string layer_unsupported(const llama_hparams & hparams, uint32_t il, const ggml_tensor * k, const ggml_tensor * v) {
    if (!k || !v) {
        return "compressed storage needs K and V in every cached layer (this model's cache has no V)";
    }
    // a row holds one head: the cache type's blocks must not straddle heads
    if (hparams.n_embd_head_k(il) % ggml_blck_size(k->type) != 0 || hparams.n_embd_head_v(il) % ggml_blck_size(v->type) != 0) {
        return std::string("compressed storage needs the head size to be a multiple of the cache type's block (") +
            ggml_type_name(k->type) + "/" + ggml_type_name(v->type) + ")";
    }
    return "";
}

llama_kv_cache_compressed::llama_kv_cache_compressed(const llama_model & model) : model(model), hparams(model.hparams) {}

std::unique_ptr<llama_kv_cache_compressed> llama_kv_cache_compressed::create(const llama_model & model, const llama_kv_cache & tmpl,
        const uint32_t * capacities, const uint32_t * slots, int32_t n, int32_t & code, std::string & err) {
    const auto & hparams = model.hparams;

    std::unique_ptr<llama_kv_cache_compressed> res(new llama_kv_cache_compressed(model));

    // the layers upstream's cache holds, with its types and its devices; allocated below
    for (uint32_t il : tmpl.get_layer_ids()) {
        const ggml_tensor * k = tmpl.get_k_storage(il);
        const ggml_tensor * v = tmpl.get_v_storage(il);
        err = layer_unsupported(hparams, il, k, v);
        if (!err.empty()) {
            code = LLAMA_LOCALKV_ERR_UNSUPPORTED;
            return nullptr;
        }
        llama_kv_compressed_layer layer;
        layer.il        = (int32_t) il;
        layer.n_head    = hparams.n_head(il);
        layer.n_head_kv = hparams.n_head_kv(il);
        layer.buft      = ggml_backend_buffer_get_type(k->buffer);
        layer.out_prod  = runs_out_prod(layer.buft);
        layer.heads_alone = model.layers[il].attn_sinks != nullptr || hparams.f_max_alibi_bias > 0.0f;
        // type carriers: allocate() reads the cache types from these until the real tensors replace them
        layer.k = const_cast<ggml_tensor *>(k);
        layer.v = const_cast<ggml_tensor *>(v);
        res->map_layer_ids[layer.il] = (int32_t) res->layers.size();
        res->layers.push_back(std::move(layer));
    }

    code = res->check_sizes(capacities, slots, n, err);
    if (code != LLAMA_LOCALKV_OK) {
        return nullptr;
    }
    res->slot_pad = slot_pad_for(res->layers);

    res->rot[0] = rotation_of(tmpl, false);
    res->rot[1] = rotation_of(tmpl, true);

    storage st;
    code = res->allocate(capacities, slots, 0, false, st, err);
    if (code != LLAMA_LOCALKV_OK) {
        return nullptr;
    }
    res->install(st);

    return res;
}

// check per-(layer, KV head) capacities and slot counts against the cached layers
int32_t llama_kv_cache_compressed::check_sizes(const uint32_t * capacities, const uint32_t * slots, int32_t n, std::string & err) const {
    const size_t n_heads = n_heads_total();
    if (capacities == nullptr || slots == nullptr || n < 0 || (size_t) n != n_heads) {
        err = "expected " + std::to_string(n_heads) + " capacities and slot counts (one per KV head of every cached layer), got " +
            std::to_string(n) + (capacities == nullptr || slots == nullptr ? " (or a NULL array)" : "");
        return LLAMA_LOCALKV_ERR_ARG;
    }
    size_t k = 0;
    for (size_t i = 0; i < layers.size(); ++i) {
        for (uint32_t h = 0; h < layers[i].n_head_kv; ++h, ++k) {
            const std::string where = " of cached layer " + std::to_string(i) + " KV head " + std::to_string(h);
            if (capacities[k] == 0 || capacities[k] > MAX_SLOTS) {
                err = "capacity " + std::to_string(capacities[k]) + where + " is out of range";
                return LLAMA_LOCALKV_ERR_BUDGET;
            }
            if (slots[k] == 0 || slots[k] > MAX_SLOTS) {
                err = "slot count " + std::to_string(slots[k]) + where + " is out of range";
                return LLAMA_LOCALKV_ERR_BUDGET;
            }
        }
    }
    return check_pod_layout(pod_leader, capacities, slots, err);
}

void llama_kv_cache_compressed::current_sizes(std::vector<uint32_t> & capacities, std::vector<uint32_t> & slots) const {
    for (const auto & layer : layers) {
        capacities.insert(capacities.end(), layer.capacity.begin(), layer.capacity.end());
        slots.insert(slots.end(), layer.alloc.begin(), layer.alloc.end());
    }
}

//
// storage
//

// allocate the tensors of every context in a buffer of its buffer type, zeroed; the buffers are appended to `bufs`
static bool alloc_zeroed_buffers(std::map<ggml_backend_buffer_type_t, ggml_context_ptr> & ctxs,
        std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> & bufs) {
    for (auto & [buft, c] : ctxs) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(c.get(), buft);
        if (!buf) {
            return false;
        }
        ggml_backend_buffer_clear(buf, 0);
        bufs.emplace_back(std::move(c), ggml_backend_buffer_ptr(buf));
    }
    return true;
}

// one zeroed tensor per buffer type holding a block of `type` for every layer on it (`elems(layer)` elements),
// each layer's tensor a view of its block (made by `view`): one transfer then reads or writes every layer of a
// device. The buffers and their contexts (the tensor and its views) are appended to `bufs`; `assign` stores a view.
template <typename Elems, typename View>
static bool alloc_blocks(std::vector<llama_kv_compressed_layer> & layers, ggml_type type, const char * name,
        Elems && elems, View && view, std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> & bufs) {
    std::map<ggml_backend_buffer_type_t, std::vector<size_t>> by_buft;
    for (size_t i = 0; i < layers.size(); ++i) {
        by_buft[layers[i].buft].push_back(i);
    }
    for (const auto & [buft, members] : by_buft) {
        int64_t n = 0;
        for (size_t i : members) {
            n += elems(layers[i]);
        }
        ggml_context_ptr ctx(llama_kv_compressed_meta_ctx(members.size() + 1));
        ggml_tensor * block = ggml_new_tensor_1d(ctx.get(), type, n);
        ggml_set_name(block, name);
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx.get(), buft);
        if (!buf) {
            return false;
        }
        ggml_backend_buffer_clear(buf, 0);
        size_t offset = 0;
        for (size_t i : members) {
            ggml_tensor * t = view(ctx.get(), block, layers[i], offset);
            ggml_backend_view_init(t);
            offset += ggml_nbytes(t);
        }
        bufs.emplace_back(std::move(ctx), ggml_backend_buffer_ptr(buf));
    }
    return true;
}

// allocate the statistics in `mask` for every layer (sized by layers[i].total): per statistic, one block per buffer
// type (see alloc_blocks); the buffers are appended to `bufs`
static bool alloc_stats(std::vector<llama_kv_compressed_layer> & layers, uint32_t mask, bool query_heads,
        std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> & bufs) {
    for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
        if (!(mask & (1u << s))) {
            continue;
        }
        const bool per_slot = llama_kv_compressed_layer::written_with_token(s);
        auto elems = [&](const llama_kv_compressed_layer & layer) {
            return (int64_t) layer.total*layer.stat_rows(s, query_heads);
        };
        auto view = [&](ggml_context * ctx, ggml_tensor * block, llama_kv_compressed_layer & layer, size_t offset) {
            ggml_tensor * t = per_slot ?
                ggml_view_2d(ctx, block, 1, layer.total, sizeof(float), offset) : // a row per slot
                ggml_view_1d(ctx, block, elems(layer), offset);
            ggml_format_name(t, "localkv_stat%d_l%d", s, layer.il);
            return layer.stats[s] = t;
        };
        if (!alloc_blocks(layers, GGML_TYPE_F32, "localkv_stats", elems, view, bufs)) {
            return false;
        }
    }
    return true;
}

// a row per slot of every layer ([1, total] of `type`), stored in the layer's `member` (the live masks; POD's
// distant rows), one block per buffer type
static bool alloc_slot_rows(std::vector<llama_kv_compressed_layer> & layers, ggml_type type, const char * name,
        ggml_tensor * llama_kv_compressed_layer::* member, std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> & bufs) {
    auto elems = [](const llama_kv_compressed_layer & layer) { return (int64_t) layer.total; };
    auto view = [&](ggml_context * ctx, ggml_tensor * block, llama_kv_compressed_layer & layer, size_t offset) {
        ggml_tensor * t = ggml_view_2d(ctx, block, 1, layer.total, ggml_element_size(block), offset);
        ggml_format_name(t, "%s_l%d", name, layer.il);
        return layer.*member = t;
    };
    return alloc_blocks(layers, type, name, elems, view, bufs);
}

// int32 aliases of the K/V bytes of every layer, for bit-exact moves on the backend (none for a type whose head
// rows are not whole int32 words: those are compacted through the host)
static bool alias_raw_rows(std::vector<llama_kv_compressed_layer> & layers, ggml_context_ptr & raw_ctx) {
    raw_ctx.reset(llama_kv_compressed_meta_ctx(2*layers.size() + 8));
    for (auto & layer : layers) {
        for (int kv = 0; kv < 2; ++kv) {
            ggml_tensor * t = kv == 0 ? layer.k : layer.v;
            if (t->nb[1] % sizeof(int32_t) != 0) {
                continue;
            }
            ggml_tensor * raw = ggml_new_tensor_2d(raw_ctx.get(), GGML_TYPE_I32, t->nb[1]/sizeof(int32_t), t->ne[1]);
            if (ggml_backend_tensor_alloc(t->buffer, raw, t->data) != GGML_STATUS_SUCCESS) {
                return false;
            }
            (kv == 0 ? layer.k_raw : layer.v_raw) = raw;
        }
    }
    return true;
}

llama_kv_compressed_layer llama_kv_cache_compressed::layout_layer(const llama_kv_compressed_layer & old,
        const uint32_t * capacities, const uint32_t * slots, size_t k) const {
    llama_kv_compressed_layer layer;
    layer.il        = old.il;
    layer.n_head    = old.n_head;
    layer.n_head_kv = old.n_head_kv;
    layer.buft      = old.buft;
    layer.out_prod  = old.out_prod;
    layer.heads_alone = old.heads_alone;
    for (uint32_t h = 0; h < layer.n_head_kv; ++h, ++k) {
        layer.capacity.push_back(capacities[k]);
        layer.alloc.push_back(GGML_PAD(slots[k], slot_pad));
        layer.base.push_back(layer.total);
        layer.total += layer.alloc.back();
        // a POD follower's K region holds its proximal tokens only
        layer.leader.push_back(pod_leader.empty() ? -1 : pod_leader[k]);
        layer.k_alloc.push_back(layer.leader.back() >= 0 ? GGML_PAD(pod_n_sink + pod_n_recent, slot_pad) : layer.alloc.back());
        layer.k_base.push_back(layer.k_total);
        layer.k_total += layer.k_alloc.back();
    }
    layer.leads.assign(layer.n_head_kv, 0);
    layer.n_written = old.n_written.size() == layer.n_head_kv ? old.n_written : std::vector<uint32_t>(layer.n_head_kv, 0);
    layer.n_used.assign(layer.n_head_kv, 0);
    layer.stale_end.assign(layer.n_head_kv, 0); // fresh buffers are zeroed
    layer.pos.assign(layer.total, -1);
    return layer;
}

int32_t llama_kv_cache_compressed::allocate(const uint32_t * capacities, const uint32_t * slots, uint32_t stat_mask,
        bool per_query_head, storage & out, std::string & err) const {
    // K/V tensors, one ggml context per buffer type (as upstream's cache does)
    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> kv_ctxs;

    size_t k = 0; // per-head index into capacities and slots
    for (const auto & old : layers) {
        llama_kv_compressed_layer layer = layout_layer(old, capacities, slots, k);
        k += layer.n_head_kv;

        auto & kctx = kv_ctxs[layer.buft];
        if (!kctx) {
            kctx.reset(llama_kv_compressed_meta_ctx(2*layers.size() + 8));
        }

        // a row per (KV head, slot); the names are upstream's (cache_k_l<il>), as tools that look for them expect
        const int32_t il = layer.il;
        layer.k = ggml_new_tensor_2d(kctx.get(), old.k->type, hparams.n_embd_head_k(il), layer.k_total);
        layer.v = ggml_new_tensor_2d(kctx.get(), old.v->type, hparams.n_embd_head_v(il), layer.total);
        ggml_format_name(layer.k, "cache_k_l%d", il);
        ggml_format_name(layer.v, "cache_v_l%d", il);

        out.layers.push_back(std::move(layer));
    }
    for (auto & layer : out.layers) {
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            if (layer.leader[h] >= 0) {
                out.layers[layer.leader[h]].leads[h] = 1;
            }
        }
    }

    // the live masks: buffers of their own, not KV
    if (!alloc_zeroed_buffers(kv_ctxs, out.kv_bufs) ||
            !alloc_slot_rows(out.layers, GGML_TYPE_F16, "localkv_live", &llama_kv_compressed_layer::live, out.live_bufs) ||
            (!pod_leader.empty() &&
             !alloc_slot_rows(out.layers, GGML_TYPE_F32, "localkv_distant", &llama_kv_compressed_layer::distant, out.live_bufs))) {
        err = "failed to allocate the compressed KV buffers";
        return LLAMA_LOCALKV_ERR_ALLOC;
    }
    if (!alias_raw_rows(out.layers, out.raw_ctx)) {
        err = "failed to alias the compressed KV buffers";
        return LLAMA_LOCALKV_ERR_ALLOC;
    }
    if (!alloc_stats(out.layers, stat_mask, per_query_head, out.stat_bufs)) {
        err = "failed to allocate the compressed KV statistics";
        return LLAMA_LOCALKV_ERR_ALLOC;
    }

    return LLAMA_LOCALKV_OK;
}

void llama_kv_cache_compressed::install(storage & st) {
    layers    = std::move(st.layers);
    kv_bufs   = std::move(st.kv_bufs);
    live_bufs = std::move(st.live_bufs);
    stat_bufs = std::move(st.stat_bufs);
    raw_ctx   = std::move(st.raw_ctx);
    epoch     = llama_kv_compressed_next_epoch();
    live_dirty = true;

    size_t total = 0;
    for (const auto & [c, buf] : kv_bufs) {
        total += ggml_backend_buffer_get_size(buf.get());
    }
    LLAMA_LOG_DEBUG("%s: compressed KV cache: %d layers, KV buffers %.2f MiB\n", __func__,
            (int) layers.size(), total/1024.0/1024.0);
}

// copy rows [a0, a0 + n) of src to rows [b0, b0 + n) of dst (the same row size), backend to backend
static void copy_rows(ggml_context * ctx, ggml_tensor * src, size_t a0, ggml_tensor * dst, size_t b0, size_t n) {
    if (n == 0) {
        return;
    }
    GGML_ASSERT(src->nb[1] == dst->nb[1] && src->ne[0] == dst->ne[0]);
    ggml_tensor * a = ggml_view_2d(ctx, src, src->ne[0], n, src->nb[1], a0*src->nb[1]);
    ggml_tensor * b = ggml_view_2d(ctx, dst, dst->ne[0], n, dst->nb[1], b0*dst->nb[1]);
    ggml_backend_view_init(a);
    ggml_backend_view_init(b);
    ggml_backend_tensor_copy(a, b);
}

void llama_kv_cache_compressed::carry_over(const llama_kv_compressed_layer & old, llama_kv_compressed_layer & layer) const {
    layer.n_used = old.n_used;

    // views of this layer: two per statistic, then two per copied block (K, V, every statistic row)
    const uint32_t group = old.n_head / old.n_head_kv;
    ggml_context_ptr vctx(llama_kv_compressed_meta_ctx(2*LLAMA_LOCALKV_STAT_COUNT +
                (size_t) 2*old.n_head_kv*(2 + LLAMA_LOCALKV_STAT_COUNT*group) + 8));

    // every statistic as a column of floats ([1, n], VNORM's own shape), so its blocks copy as rows
    ggml_tensor * cols[LLAMA_LOCALKV_STAT_COUNT][2] = {};
    for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
        if (old.stats[s]) {
            cols[s][0] = ggml_view_2d(vctx.get(), old.stats[s],   1, ggml_nelements(old.stats[s]),   sizeof(float), 0);
            cols[s][1] = ggml_view_2d(vctx.get(), layer.stats[s], 1, ggml_nelements(layer.stats[s]), sizeof(float), 0);
        }
    }

    for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
        const uint32_t n_used = old.n_used[h];
        // a follower's K region does not depend on its slots: it moves whole
        copy_rows(vctx.get(), old.k, old.k_base[h], layer.k, layer.k_base[h], old.leader[h] >= 0 ? old.k_alloc[h] : n_used);
        copy_rows(vctx.get(), old.v, old.base[h], layer.v, layer.base[h], n_used);
        for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
            const uint32_t rows = old.stat_rows(s, query_heads);
            for (uint32_t g = 0; cols[s][0] && g < rows; ++g) {
                copy_rows(vctx.get(), cols[s][0], old.stat_offset(rows, h, g), cols[s][1], layer.stat_offset(rows, h, g), n_used);
            }
        }
        std::copy_n(old.pos.begin() + old.base[h], n_used, layer.pos.begin() + layer.base[h]);
    }
}

int32_t llama_kv_cache_compressed::resize(const uint32_t * capacities, const uint32_t * slots, int32_t n, std::string & err) {
    int32_t rc = check_sizes(capacities, slots, n, err);
    if (rc != LLAMA_LOCALKV_OK) {
        return rc;
    }
    GGML_ASSERT(!has_pending()); // the caller flushes first
    size_t k = 0;
    for (size_t i = 0; i < layers.size(); ++i) {
        const auto & layer = layers[i];
        for (uint32_t h = 0; h < layer.n_head_kv; ++h, ++k) {
            if (layer.n_used[h] > GGML_PAD(slots[k], slot_pad)) {
                err = "cached layer " + std::to_string(i) + " KV head " + std::to_string(h) + " holds " + std::to_string(layer.n_used[h]) +
                    " tokens, more than its new slot count " + std::to_string(slots[k]) + ": keep fewer first";
                return LLAMA_LOCALKV_ERR_STATE;
            }
        }
    }

    storage st;
    rc = allocate(capacities, slots, stat_alloc, query_heads, st, err);
    if (rc != LLAMA_LOCALKV_OK) {
        return rc;
    }

    // carry the tokens in use over, backend to backend: K/V rows byte for byte, statistics, positions
    for (size_t i = 0; i < layers.size(); ++i) {
        carry_over(layers[i], st.layers[i]);
    }

    install(st);

    return LLAMA_LOCALKV_OK;
}

//
// statistics storage
//

int32_t llama_kv_cache_compressed::set_stats(uint32_t flags, uint32_t window, bool per_query_head, std::string & err) {
    GGML_ASSERT(!has_pending()); // the caller flushes first
    if (per_query_head != query_heads) {
        // another storage shape: every statistic starts again from zero
        for (auto & layer : layers) {
            std::fill(std::begin(layer.stats), std::end(layer.stats), nullptr);
        }
        stat_bufs.clear();
        stat_alloc  = 0;
        query_heads = per_query_head;
        epoch       = llama_kv_compressed_next_epoch();
    }
    const uint32_t add = flags & ~stat_alloc;
    if (add != 0) {
        if (!alloc_stats(layers, add, query_heads, stat_bufs)) {
            for (auto & layer : layers) {
                for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
                    if (add & (1u << s)) {
                        layer.stats[s] = nullptr;
                    }
                }
            }
            err = "failed to allocate the compressed KV statistics";
            return LLAMA_LOCALKV_ERR_ALLOC;
        }
        stat_alloc |= add;
        epoch = llama_kv_compressed_next_epoch();
    }
    stat_flags = flags;
    obs_window = window;
    return LLAMA_LOCALKV_OK;
}

//
// learned scorers (KVzap): small weight tensors on each layer's device, kept across reallocations
//

int32_t llama_kv_cache_compressed::set_scorer(int32_t i, int32_t n_in, int32_t n_hidden, const float * w1, const float * b1,
        const float * w2, const float * b2, std::string & err) {
    if (i < 0 || i >= (int32_t) layers.size()) {
        err = "no cached layer " + std::to_string(i);
        return LLAMA_LOCALKV_ERR_LAYER;
    }
    scorers.resize(layers.size());
    scorer & sc = scorers[i];
    if (!w1) {
        sc = scorer();
        epoch = llama_kv_compressed_next_epoch(); // a graph built with the scorer is never reused
        return LLAMA_LOCALKV_OK;
    }
    const auto & layer = layers[i];
    if (n_in != (int32_t) hparams.n_embd) {
        err = "scorer input width " + std::to_string(n_in) + " is not the model's embedding width " + std::to_string(hparams.n_embd);
        return LLAMA_LOCALKV_ERR_ARG;
    }
    if (n_hidden < 0 || n_hidden > (1 << 16) || !b1 || (n_hidden > 0 && (!w2 || !b2))) {
        err = "a scorer needs w1 and b1, and w2 and b2 with a hidden width in [1, 65536]";
        return LLAMA_LOCALKV_ERR_ARG;
    }
    const int64_t n_out = n_hidden > 0 ? n_hidden : layer.n_head_kv;
    scorer next;
    next.ctx.reset(llama_kv_compressed_meta_ctx(4));
    next.w1 = ggml_new_tensor_2d(next.ctx.get(), GGML_TYPE_F32, n_in, n_out);
    next.b1 = ggml_new_tensor_1d(next.ctx.get(), GGML_TYPE_F32, n_out);
    if (n_hidden > 0) {
        next.w2 = ggml_new_tensor_2d(next.ctx.get(), GGML_TYPE_F32, n_hidden, layer.n_head_kv);
        next.b2 = ggml_new_tensor_1d(next.ctx.get(), GGML_TYPE_F32, layer.n_head_kv);
    }
    next.buf.reset(ggml_backend_alloc_ctx_tensors_from_buft(next.ctx.get(), layer.buft));
    if (!next.buf) {
        err = "failed to allocate the scorer of cached layer " + std::to_string(i);
        return LLAMA_LOCALKV_ERR_ALLOC;
    }
    ggml_backend_tensor_set(next.w1, w1, 0, ggml_nbytes(next.w1));
    ggml_backend_tensor_set(next.b1, b1, 0, ggml_nbytes(next.b1));
    if (n_hidden > 0) {
        ggml_backend_tensor_set(next.w2, w2, 0, ggml_nbytes(next.w2));
        ggml_backend_tensor_set(next.b2, b2, 0, ggml_nbytes(next.b2));
    }
    sc = std::move(next);
    epoch = llama_kv_compressed_next_epoch(); // a graph built with the old weights (or none) is never reused
    return LLAMA_LOCALKV_OK;
}
