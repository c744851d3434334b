// localkv compressed KV cache: a memory module of its own (storage, per-ubatch plans, keep/evict) and the
// graph pieces llama-graph.cpp asks it for. The layout is described in llama-kv-compress.h.

#include "llama-kv-compress.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

// n_kv is padded like the plain cache's (backends pick faster kernels), but never past the allocation
static constexpr uint32_t CMP_N_KV_PAD = 256;

// slots are allocated in multiples of this (keeps rows of every quantized type block-aligned)
static constexpr uint32_t CMP_ALLOC_PAD = 32;

// refuse absurd budgets before asking a backend for the memory
static constexpr uint64_t CMP_MAX_SLOTS = 1u << 24;

// a new value for every storage change of any compressed cache (see llama_kv_cache_cmp::epoch)
static uint32_t cmp_next_epoch() {
    static std::atomic<uint32_t> epoch{0};
    return ++epoch;
}

// rows a statistic keeps per KV head: one, or its GQA group's query heads when asked for (VNORM is a
// property of a KV head's value)
static uint32_t cmp_stat_group(const llama_kv_cmp_layer & cl, int32_t stat, bool query_heads) {
    return stat == LLAMA_LOCALKV_STAT_VNORM || !query_heads ? 1 : cl.n_head / cl.n_head_kv;
}

// float offset of slot 0 of row g (of `group`) of KV head h in a statistic (layout in llama-kv-compress.h)
static size_t cmp_stat_offset(const llama_kv_cmp_layer & cl, uint32_t group, uint32_t h, uint32_t g) {
    return (size_t) cl.base[h]*group + (size_t) g*cl.alloc[h];
}

// a no_alloc ggml context for n_tensors tensor headers
static ggml_context * cmp_meta_ctx(size_t n_tensors) {
    ggml_init_params params = {
        /*.mem_size   =*/ n_tensors*ggml_tensor_overhead(),
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ true,
    };
    return ggml_init(params);
}

std::vector<uint32_t> llama_kv_cmp_plan::signature(uint32_t n_tokens) const {
    std::vector<uint32_t> sig = { epoch, n_tokens, width, window, flags, hide ? 1u : 0u };
    for (const auto & lp : parts) {
        sig.push_back((uint32_t) lp.size());
        for (const auto & p : lp) {
            sig.push_back(p.h0);
            sig.push_back(p.nh);
            sig.push_back(z - p.ins);
            sig.push_back(p.n_kv);
            sig.push_back((uint32_t) (p.lead + 1));
            sig.push_back(p.pod_class);
        }
    }
    return sig;
}

//
// creation and storage
//

// the Hadamard rotation `tmpl` applies to K (v = false) or V, copied to the host (empty when it applies none):
// asked through upstream's own input API, so a compressed cache rotates exactly as the plain one would
static std::vector<float> cmp_rotation_of(const llama_kv_cache & tmpl, bool v) {
    ggml_context_ptr ctx(cmp_meta_ctx(1));
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
static bool cmp_runs_out_prod(ggml_backend_buffer_type_t buft) {
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (!dev && ggml_backend_buft_is_host(buft)) {
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU); // ggml's CPU buffer type names no device
    }
    if (!dev) {
        return false;
    }
    ggml_context_ptr ctx(cmp_meta_ctx(3));
    ggml_tensor * a = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, 64, 8, 2);
    ggml_tensor * b = ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, 1, 8, 2);
    return ggml_backend_dev_supports_op(dev, ggml_out_prod(ctx.get(), a, b));
}

llama_kv_cache_cmp::llama_kv_cache_cmp(const llama_model & model) : model(model), hparams(model.hparams) {}

std::unique_ptr<llama_kv_cache_cmp> llama_kv_cache_cmp::create(const llama_model & model, const llama_kv_cache & tmpl,
        const uint32_t * caps, const uint32_t * slots, int32_t n, int32_t & code, std::string & err) {
    const auto & hparams = model.hparams;

    std::unique_ptr<llama_kv_cache_cmp> res(new llama_kv_cache_cmp(model));

    // the layers upstream's cache holds, with its types and its devices; allocated below
    for (uint32_t il : tmpl.get_layer_ids()) {
        const ggml_tensor * k = tmpl.get_k_storage(il);
        const ggml_tensor * v = tmpl.get_v_storage(il);
        if (!k || !v) {
            code = LLAMA_LOCALKV_ERR_UNSUPPORTED;
            err  = "compressed storage needs K and V in every cached layer (this model's cache has no V)";
            return nullptr;
        }
        // a row holds one head: the cache type's blocks must not straddle heads
        if (hparams.n_embd_head_k(il) % ggml_blck_size(k->type) != 0 || hparams.n_embd_head_v(il) % ggml_blck_size(v->type) != 0) {
            code = LLAMA_LOCALKV_ERR_UNSUPPORTED;
            err  = std::string("compressed storage needs the head size to be a multiple of the cache type's block (") +
                ggml_type_name(k->type) + "/" + ggml_type_name(v->type) + ")";
            return nullptr;
        }
        llama_kv_cmp_layer cl;
        cl.il        = (int32_t) il;
        cl.n_head    = hparams.n_head(il);
        cl.n_head_kv = hparams.n_head_kv(il);
        cl.buft      = ggml_backend_buffer_get_type(k->buffer);
        cl.out_prod  = cmp_runs_out_prod(cl.buft);
        // type carriers: allocate() reads the cache types from these until the real tensors replace them
        cl.k = const_cast<ggml_tensor *>(k);
        cl.v = const_cast<ggml_tensor *>(v);
        res->map_layer_ids[cl.il] = (int32_t) res->layers.size();
        res->layers.push_back(std::move(cl));
    }

    code = res->check_sizes(caps, slots, n, err);
    if (code != LLAMA_LOCALKV_OK) {
        return nullptr;
    }

    res->rot[0] = cmp_rotation_of(tmpl, false);
    res->rot[1] = cmp_rotation_of(tmpl, true);

    storage st;
    code = res->allocate(caps, slots, 0, false, st, err);
    if (code != LLAMA_LOCALKV_OK) {
        return nullptr;
    }
    res->install(st);

    return res;
}

uint32_t llama_kv_cmp_extra_nodes(const llama_memory_i * mem) {
    const auto * kv = dynamic_cast<const llama_kv_cache_cmp *>(mem);
    return kv ? 128*kv->n_heads_total() + 256 : 0; // per part: attention, statistics, a max tree
}

int32_t llama_kv_cache_cmp::layer_index(int32_t il) const {
    return map_layer_ids.at(il);
}

uint32_t llama_kv_cache_cmp::n_heads_total() const {
    uint32_t n = 0;
    for (const auto & cl : layers) {
        n += cl.n_head_kv;
    }
    return n;
}

size_t llama_kv_cache_cmp::stats_bytes() const {
    size_t total = 0;
    for (const auto & [c, buf] : stat_bufs) {
        total += ggml_backend_buffer_get_size(buf.get());
    }
    return total;
}

// check per-(layer, KV head) capacities and slot counts against the cached layers
int32_t llama_kv_cache_cmp::check_sizes(const uint32_t * caps, const uint32_t * slots, int32_t n, std::string & err) const {
    const size_t n_heads = n_heads_total();
    if (caps == nullptr || slots == nullptr || n < 0 || (size_t) n != n_heads) {
        err = "expected " + std::to_string(n_heads) + " capacities and slot counts (one per KV head of every cached layer), got " +
            std::to_string(n) + (caps == nullptr || slots == nullptr ? " (or a NULL array)" : "");
        return LLAMA_LOCALKV_ERR_ARG;
    }
    size_t k = 0;
    for (size_t i = 0; i < layers.size(); ++i) {
        for (uint32_t h = 0; h < layers[i].n_head_kv; ++h, ++k) {
            const std::string where = " of cached layer " + std::to_string(i) + " KV head " + std::to_string(h);
            if (caps[k] == 0 || caps[k] > CMP_MAX_SLOTS) {
                err = "capacity " + std::to_string(caps[k]) + where + " is out of range";
                return LLAMA_LOCALKV_ERR_BUDGET;
            }
            if (slots[k] == 0 || slots[k] > CMP_MAX_SLOTS) {
                err = "slot count " + std::to_string(slots[k]) + where + " is out of range";
                return LLAMA_LOCALKV_ERR_BUDGET;
            }
        }
    }
    return check_pod(pod_leader, caps, slots, err);
}

// a POD layout: every follower follows an earlier layer's same KV head, which leads (follows no one), with the
// same capacity and slots (the leader's logits cover the follower's slots column for column)
int32_t llama_kv_cache_cmp::check_pod(const std::vector<int32_t> & leader, const uint32_t * caps, const uint32_t * slots,
        std::string & err) const {
    if (leader.empty()) {
        return LLAMA_LOCALKV_OK;
    }
    std::vector<size_t> head0(layers.size() + 1, 0);
    for (size_t i = 0; i < layers.size(); ++i) {
        head0[i + 1] = head0[i] + layers[i].n_head_kv;
    }
    for (size_t i = 0; i < layers.size(); ++i) {
        for (uint32_t h = 0; h < layers[i].n_head_kv; ++h) {
            const int32_t l = leader[head0[i] + h];
            if (l < 0) {
                continue;
            }
            const std::string where = "cached layer " + std::to_string(i) + " KV head " + std::to_string(h);
            if ((size_t) l >= i || h >= layers[l].n_head_kv || leader[head0[l] + h] >= 0) {
                err = where + " cannot follow cached layer " + std::to_string(l) +
                    ": a leader is an earlier layer whose same KV head follows no one";
                return LLAMA_LOCALKV_ERR_ARG;
            }
            if (hparams.n_embd_head_k(layers[l].il) != hparams.n_embd_head_k(layers[i].il) ||
                layers[l].n_head/layers[l].n_head_kv != layers[i].n_head/layers[i].n_head_kv) {
                err = where + " and its leader differ in head size or GQA group";
                return LLAMA_LOCALKV_ERR_ARG;
            }
            const size_t a = head0[i] + h, b = head0[l] + h;
            if (caps && slots && (caps[a] != caps[b] || GGML_PAD(slots[a], CMP_ALLOC_PAD) != GGML_PAD(slots[b], CMP_ALLOC_PAD))) {
                err = where + " must have its leader's capacity and slots (it holds the same tokens)";
                return LLAMA_LOCALKV_ERR_BUDGET;
            }
        }
    }
    return LLAMA_LOCALKV_OK;
}

int32_t llama_kv_cache_cmp::set_pod(const int32_t * leader, int32_t n, uint32_t n_sink, uint32_t n_recent, std::string & err) {
    GGML_ASSERT(!has_pending()); // the caller flushes first
    const size_t n_heads = n_heads_total();
    if (leader == nullptr || n < 0 || (size_t) n != n_heads) {
        err = "expected " + std::to_string(n_heads) + " leaders (one per KV head of every cached layer), got " + std::to_string(n);
        return LLAMA_LOCALKV_ERR_ARG;
    }
    for (const auto & cl : layers) {
        for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
            if (cl.n_used[h] > 0 || cl.n_written[h] > 0) {
                err = "POD leaders are set on an empty cache (clear it first)";
                return LLAMA_LOCALKV_ERR_STATE;
            }
        }
    }
    std::vector<int32_t> lead(leader, leader + n);
    const bool on = std::any_of(lead.begin(), lead.end(), [](int32_t l) { return l >= 0; });
    if (on && (n_recent == 0 || (uint64_t) n_sink + n_recent > CMP_MAX_SLOTS)) {
        err = "POD needs 1 <= n_recent and n_sink + n_recent <= " + std::to_string(CMP_MAX_SLOTS);
        return LLAMA_LOCALKV_ERR_BUDGET;
    }
    // the current capacities and slots, per head
    std::vector<uint32_t> caps, slots;
    for (const auto & cl : layers) {
        caps.insert(caps.end(), cl.cap.begin(), cl.cap.end());
        slots.insert(slots.end(), cl.alloc.begin(), cl.alloc.end());
    }
    if (!on) {
        lead.clear();
    }
    int32_t rc = check_pod(lead, caps.data(), slots.data(), err);
    if (rc != LLAMA_LOCALKV_OK) {
        return rc;
    }

    const auto keep_leader = pod_leader;
    const uint32_t keep_sink = pod_n_sink, keep_recent = pod_n_recent;
    pod_leader   = lead;
    pod_n_sink   = on ? n_sink : 0;
    pod_n_recent = on ? n_recent : 0;

    storage st;
    rc = allocate(caps.data(), slots.data(), stat_alloc, query_heads, st, err);
    if (rc != LLAMA_LOCALKV_OK) {
        pod_leader   = keep_leader;
        pod_n_sink   = keep_sink;
        pod_n_recent = keep_recent;
        return rc;
    }
    install(st);
    return LLAMA_LOCALKV_OK;
}

void llama_kv_cache_cmp::pod_proximal(const llama_kv_cmp_layer & cl, uint32_t h, uint32_t & n_sink, uint32_t & first_recent) const {
    if (cl.leader[h] < 0 && !cl.leads[h]) {
        n_sink = cl.n_used[h];
        first_recent = cl.n_used[h];
        return;
    }
    // sinks and recent tokens are never evicted (keep refuses it), so they are the head's first and last slots
    const uint32_t w = cl.n_written[h];
    const uint32_t n_rec = std::min(pod_n_recent, w - std::min(pod_n_sink, w));
    n_sink = std::min({pod_n_sink, w, cl.n_used[h]});
    first_recent = std::max(n_sink, cl.n_used[h] - std::min(n_rec, cl.n_used[h]));
}

// every follower holds exactly its leader's tokens, slot for slot
bool llama_kv_cache_cmp::pod_check(std::string & err) const {
    for (size_t i = 0; i < layers.size(); ++i) {
        const auto & cl = layers[i];
        for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
            if (cl.leader[h] < 0) {
                continue;
            }
            const auto & lc = layers[cl.leader[h]];
            const bool same = lc.n_used[h] == cl.n_used[h] && lc.n_written[h] == cl.n_written[h] &&
                std::equal(cl.pos.begin() + cl.base[h], cl.pos.begin() + cl.base[h] + cl.n_used[h], lc.pos.begin() + lc.base[h]);
            if (!same) {
                err = "POD follower (cached layer " + std::to_string(i) + ", KV head " + std::to_string(h) +
                    ") does not hold the tokens its leader (cached layer " + std::to_string(cl.leader[h]) + ") holds: keep the same slots in both";
                return false;
            }
        }
    }
    return true;
}

// allocate the statistics in `mask` for every layer (sized by cls[i].total), in buffers of the layers'
// buffer types; the buffers are appended to `bufs`
static bool cmp_alloc_stats(std::vector<llama_kv_cmp_layer> & cls, uint32_t mask, bool query_heads,
        std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> & bufs) {
    if (mask == 0) {
        return true;
    }
    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> ctxs;
    for (auto & cl : cls) {
        auto & c = ctxs[cl.buft];
        if (!c) {
            c.reset(cmp_meta_ctx(LLAMA_LOCALKV_STAT_COUNT*cls.size() + 8));
        }
        for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
            if (mask & (1u << s)) {
                cl.stats[s] = s == LLAMA_LOCALKV_STAT_VNORM ?
                    ggml_new_tensor_2d(c.get(), GGML_TYPE_F32, 1, cl.total) : // a row per slot
                    ggml_new_tensor_1d(c.get(), GGML_TYPE_F32, (int64_t) cl.total*cmp_stat_group(cl, s, query_heads));
                ggml_format_name(cl.stats[s], "cache_cmp_stat%d_l%d", s, cl.il);
            }
        }
    }
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

int32_t llama_kv_cache_cmp::allocate(const uint32_t * caps, const uint32_t * slots, uint32_t stat_mask, bool per_query_head,
        storage & out, std::string & err) const {
    // K/V tensors, one ggml context per buffer type (as upstream's cache does)
    std::map<ggml_backend_buffer_type_t, ggml_context_ptr> kv_ctxs;

    size_t k = 0; // per-head index into caps and slots
    for (const auto & old : layers) {
        const int32_t il = old.il;

        llama_kv_cmp_layer cl;
        cl.il        = il;
        cl.n_head    = old.n_head;
        cl.n_head_kv = old.n_head_kv;
        cl.buft      = old.buft;
        cl.out_prod  = old.out_prod;
        for (uint32_t h = 0; h < cl.n_head_kv; ++h, ++k) {
            cl.cap.push_back(caps[k]);
            cl.alloc.push_back(GGML_PAD(slots[k], CMP_ALLOC_PAD));
            cl.base.push_back(cl.total);
            cl.total += cl.alloc.back();
            // a POD follower's K region holds its proximal tokens only
            cl.leader.push_back(pod_leader.empty() ? -1 : pod_leader[k]);
            cl.kalloc.push_back(cl.leader.back() >= 0 ? GGML_PAD(pod_n_sink + pod_n_recent, CMP_ALLOC_PAD) : cl.alloc.back());
            cl.kbase.push_back(cl.ktotal);
            cl.ktotal += cl.kalloc.back();
        }
        cl.leads.assign(cl.n_head_kv, 0);
        cl.n_written = old.n_written.size() == cl.n_head_kv ? old.n_written : std::vector<uint32_t>(cl.n_head_kv, 0);
        cl.n_used.assign(cl.n_head_kv, 0);
        cl.stale.assign(cl.n_head_kv, 0); // fresh buffers are zeroed
        cl.pos.assign(cl.total, -1);

        auto & kctx = kv_ctxs[cl.buft];
        if (!kctx) {
            kctx.reset(cmp_meta_ctx(2*layers.size() + 8));
        }

        // a row per (KV head, slot); the names are upstream's (cache_k_l<il>), as tools that look for them expect
        cl.k = ggml_new_tensor_2d(kctx.get(), old.k->type, hparams.n_embd_head_k(il), cl.ktotal);
        cl.v = ggml_new_tensor_2d(kctx.get(), old.v->type, hparams.n_embd_head_v(il), cl.total);
        ggml_format_name(cl.k, "cache_k_l%d", il);
        ggml_format_name(cl.v, "cache_v_l%d", il);

        out.layers.push_back(std::move(cl));
    }
    for (auto & cl : out.layers) {
        for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
            if (cl.leader[h] >= 0) {
                out.layers[cl.leader[h]].leads[h] = 1;
            }
        }
    }

    for (auto & [buft, c] : kv_ctxs) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(c.get(), buft);
        if (!buf) {
            err = "failed to allocate the compressed KV buffers";
            return LLAMA_LOCALKV_ERR_ALLOC;
        }
        ggml_backend_buffer_clear(buf, 0);
        out.kv_bufs.emplace_back(std::move(c), ggml_backend_buffer_ptr(buf));
    }

    // int32 aliases of the K/V bytes, for bit-exact moves on the backend
    out.raw_ctx.reset(cmp_meta_ctx(2*layers.size() + 8));
    for (auto & cl : out.layers) {
        for (int kv = 0; kv < 2; ++kv) {
            ggml_tensor * t = kv == 0 ? cl.k : cl.v;
            if (t->nb[1] % sizeof(int32_t) != 0) {
                continue; // this type's head rows are not whole int32 words: compacted through the host
            }
            ggml_tensor * raw = ggml_new_tensor_2d(out.raw_ctx.get(), GGML_TYPE_I32, t->nb[1]/sizeof(int32_t), t->ne[1]);
            if (ggml_backend_tensor_alloc(t->buffer, raw, t->data) != GGML_STATUS_SUCCESS) {
                err = "failed to alias the compressed KV buffers";
                return LLAMA_LOCALKV_ERR_ALLOC;
            }
            (kv == 0 ? cl.k_raw : cl.v_raw) = raw;
        }
    }

    if (!cmp_alloc_stats(out.layers, stat_mask, per_query_head, out.stat_bufs)) {
        err = "failed to allocate the compressed KV statistics";
        return LLAMA_LOCALKV_ERR_ALLOC;
    }

    return LLAMA_LOCALKV_OK;
}

void llama_kv_cache_cmp::install(storage & st) {
    layers    = std::move(st.layers);
    kv_bufs   = std::move(st.kv_bufs);
    stat_bufs = std::move(st.stat_bufs);
    raw_ctx   = std::move(st.raw_ctx);
    epoch     = cmp_next_epoch();

    size_t total = 0;
    for (const auto & [c, buf] : kv_bufs) {
        total += ggml_backend_buffer_get_size(buf.get());
    }
    LLAMA_LOG_DEBUG("%s: compressed KV cache: %d layers, KV buffers %.2f MiB\n", __func__,
            (int) layers.size(), total/1024.0/1024.0);
}

// copy rows [a0, a0 + n) of src to rows [b0, b0 + n) of dst (the same row size), backend to backend
static void cmp_copy_rows(ggml_context * ctx, ggml_tensor * src, size_t a0, ggml_tensor * dst, size_t b0, size_t n) {
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

int32_t llama_kv_cache_cmp::resize(const uint32_t * caps, const uint32_t * slots, int32_t n, std::string & err) {
    int32_t rc = check_sizes(caps, slots, n, err);
    if (rc != LLAMA_LOCALKV_OK) {
        return rc;
    }
    GGML_ASSERT(!has_pending()); // the caller flushes first
    size_t k = 0;
    for (size_t i = 0; i < layers.size(); ++i) {
        const auto & cl = layers[i];
        for (uint32_t h = 0; h < cl.n_head_kv; ++h, ++k) {
            if (cl.n_used[h] > GGML_PAD(slots[k], CMP_ALLOC_PAD)) {
                err = "cached layer " + std::to_string(i) + " KV head " + std::to_string(h) + " holds " + std::to_string(cl.n_used[h]) +
                    " tokens, more than its new slot count " + std::to_string(slots[k]) + ": keep fewer first";
                return LLAMA_LOCALKV_ERR_STATE;
            }
        }
    }

    storage st;
    rc = allocate(caps, slots, stat_alloc, query_heads, st, err);
    if (rc != LLAMA_LOCALKV_OK) {
        return rc;
    }

    // carry the tokens in use over, backend to backend: K/V rows byte for byte, statistics, positions
    for (size_t i = 0; i < layers.size(); ++i) {
        const auto & old = layers[i];
        auto & cl = st.layers[i];
        cl.n_used = old.n_used;

        // views of this layer: two per statistic, then two per copied block (K, V, every statistic row)
        const uint32_t group = old.n_head / old.n_head_kv;
        ggml_context_ptr vctx(cmp_meta_ctx(2*LLAMA_LOCALKV_STAT_COUNT + (size_t) 2*old.n_head_kv*(2 + LLAMA_LOCALKV_STAT_COUNT*group) + 8));

        // every statistic as a column of floats ([1, n], VNORM's own shape), so its blocks copy as rows
        ggml_tensor * cols[LLAMA_LOCALKV_STAT_COUNT][2] = {};
        for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
            if (old.stats[s]) {
                cols[s][0] = ggml_view_2d(vctx.get(), old.stats[s], 1, ggml_nelements(old.stats[s]), sizeof(float), 0);
                cols[s][1] = ggml_view_2d(vctx.get(), cl.stats[s],  1, ggml_nelements(cl.stats[s]),  sizeof(float), 0);
            }
        }

        for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
            const uint32_t nu = old.n_used[h];
            // a follower's K region does not depend on its slots: it moves whole
            cmp_copy_rows(vctx.get(), old.k, old.kbase[h], cl.k, cl.kbase[h], old.leader[h] >= 0 ? old.kalloc[h] : nu);
            cmp_copy_rows(vctx.get(), old.v, old.base[h], cl.v, cl.base[h], nu);
            for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
                const uint32_t r = cmp_stat_group(old, s, query_heads);
                for (uint32_t g = 0; cols[s][0] && g < r; ++g) {
                    cmp_copy_rows(vctx.get(), cols[s][0], cmp_stat_offset(old, r, h, g), cols[s][1], cmp_stat_offset(cl, r, h, g), nu);
                }
            }
            std::copy_n(old.pos.begin() + old.base[h], nu, cl.pos.begin() + cl.base[h]);
        }
    }

    install(st);

    return LLAMA_LOCALKV_OK;
}

int32_t llama_kv_cache_cmp::set_stats(uint32_t flags, uint32_t window, bool per_query_head, std::string & err) {
    GGML_ASSERT(!has_pending()); // the caller flushes first
    if (per_query_head != query_heads) {
        // another storage shape: every statistic starts again from zero
        for (auto & cl : layers) {
            std::fill(std::begin(cl.stats), std::end(cl.stats), nullptr);
        }
        stat_bufs.clear();
        stat_alloc  = 0;
        query_heads = per_query_head;
        epoch       = cmp_next_epoch();
    }
    const uint32_t add = flags & ~stat_alloc;
    if (add != 0) {
        if (!cmp_alloc_stats(layers, add, query_heads, stat_bufs)) {
            for (auto & cl : layers) {
                for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
                    if (add & (1u << s)) {
                        cl.stats[s] = nullptr;
                    }
                }
            }
            err = "failed to allocate the compressed KV statistics";
            return LLAMA_LOCALKV_ERR_ALLOC;
        }
        stat_alloc |= add;
        epoch = cmp_next_epoch();
    }
    stat_flags = flags;
    obs_window = window;
    return LLAMA_LOCALKV_OK;
}

int32_t llama_kv_cache_cmp::clear_stat(int32_t stat, std::string & err) {
    if (stat < 0 || stat >= LLAMA_LOCALKV_STAT_COUNT) {
        err = "no statistic " + std::to_string(stat);
        return LLAMA_LOCALKV_ERR_ARG;
    }
    for (auto & cl : layers) {
        if (cl.stats[stat]) {
            ggml_backend_tensor_memset(cl.stats[stat], 0, 0, ggml_nbytes(cl.stats[stat]));
        }
    }
    return LLAMA_LOCALKV_OK;
}

//
// llama_memory_i
//

llama_memory_context_ptr llama_kv_cache_cmp::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    GGML_UNUSED(embd_all);

    balloc.split_reset();

    std::vector<llama_ubatch> ubatches;
    uint32_t n_total = 0;
    while (true) {
        auto ubatch = balloc.split_simple(n_ubatch);
        if (ubatch.n_tokens == 0) {
            break;
        }
        n_total += ubatch.n_tokens;
        ubatches.push_back(std::move(ubatch)); // NOLINT
    }

    if (balloc.get_n_used() < balloc.get_n_tokens()) {
        return std::make_unique<llama_kv_cache_cmp_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }

    if (pod_dirty) {
        std::string err;
        if (!pod_check(err)) {
            LLAMA_LOG_ERROR("%s: %s\n", __func__, err.c_str());
            return std::make_unique<llama_kv_cache_cmp_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
        }
        pod_dirty = false;
    }
    // a follower's ring must hold a whole ubatch
    if (!pod_leader.empty()) {
        for (const auto & ub : ubatches) {
            if (ub.n_tokens > pod_n_recent) {
                LLAMA_LOG_ERROR("%s: a ubatch of %u tokens is longer than the POD recent window (%u): use smaller ubatches\n",
                        __func__, ub.n_tokens, pod_n_recent);
                return std::make_unique<llama_kv_cache_cmp_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
        }
    }

    // tokens are only appended while a batch runs, so every head must hold the whole batch
    for (const auto & cl : layers) {
        for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
            if (cl.n_used[h] + n_total > cl.alloc[h]) {
                LLAMA_LOG_DEBUG("%s: layer %d KV head %u has %u free slots, the batch needs %u: compress first\n", __func__,
                        cl.il, h, cl.alloc[h] - cl.n_used[h], n_total);
                return std::make_unique<llama_kv_cache_cmp_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
        }
    }

    return std::make_unique<llama_kv_cache_cmp_context>(this, std::move(ubatches));
}

llama_memory_context_ptr llama_kv_cache_cmp::init_full() {
    return std::make_unique<llama_kv_cache_cmp_context>(this);
}

llama_memory_context_ptr llama_kv_cache_cmp::init_update(llama_context * lctx, bool optimize) {
    GGML_UNUSED(optimize);
    return std::make_unique<llama_kv_cache_cmp_context>(this, lctx);
}

void llama_kv_cache_cmp::clear(bool data) {
    for (auto & cl : layers) {
        std::fill(cl.n_used.begin(), cl.n_used.end(), 0);
        std::fill(cl.stale.begin(), cl.stale.end(), 0); // the statistics buffers are cleared below
        std::fill(cl.n_written.begin(), cl.n_written.end(), 0);
        cl.pending.clear();
        std::fill(cl.pos.begin(), cl.pos.end(), -1);
    }
    pos_max = -1;

    for (auto & [c, buf] : stat_bufs) {
        ggml_backend_buffer_clear(buf.get(), 0);
    }
    if (data) {
        for (auto & [c, buf] : kv_bufs) {
            ggml_backend_buffer_clear(buf.get(), 0);
        }
    }
}

bool llama_kv_cache_cmp::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (seq_id > 0) {
        return false; // one sequence
    }
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    if (p0 >= p1) {
        return true;
    }
    if (!pod_leader.empty()) {
        // a follower's ring is indexed by the tokens written: only clearing everything keeps it right
        if (p0 > seq_pos_min(0) || p1 <= pos_max) {
            LLAMA_LOG_WARN("%s: the compressed cache cannot remove part of the sequence while POD is on\n", __func__);
            return false;
        }
        clear(false);
        return true;
    }

    llama_pos new_max = -1;

    for (size_t i = 0; i < layers.size(); ++i) {
        const auto & cl = layers[i];
        std::vector<std::vector<uint32_t>> kept(cl.n_head_kv);
        for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
            for (uint32_t s = 0; s < cl.n_used[h]; ++s) {
                const llama_pos p = cl.pos[cl.base[h] + s];
                if (p < p0 || p >= p1) {
                    kept[h].push_back(s);
                    new_max = std::max(new_max, p);
                }
            }
        }
        record_keep(i, kept);
    }

    // positions removed from the end can be written again
    if (p1 > pos_max) {
        pos_max = std::min(pos_max, p0 - 1);
        pos_max = std::max(pos_max, new_max);
    }

    return true;
}

// one sequence whose positions never move: nothing to copy, keep, shift or divide
void llama_kv_cache_cmp::seq_cp(llama_seq_id, llama_seq_id, llama_pos, llama_pos) {
    LLAMA_LOG_WARN("%s: not supported by the compressed KV cache, ignored\n", __func__);
}

void llama_kv_cache_cmp::seq_keep(llama_seq_id) {
    LLAMA_LOG_WARN("%s: not supported by the compressed KV cache, ignored\n", __func__);
}

void llama_kv_cache_cmp::seq_add(llama_seq_id, llama_pos, llama_pos, llama_pos) {
    LLAMA_LOG_WARN("%s: not supported by the compressed KV cache, ignored\n", __func__);
}

void llama_kv_cache_cmp::seq_div(llama_seq_id, llama_pos, llama_pos, int) {
    LLAMA_LOG_WARN("%s: not supported by the compressed KV cache, ignored\n", __func__);
}

llama_pos llama_kv_cache_cmp::seq_pos_min(llama_seq_id seq_id) const {
    if (seq_id != 0) {
        return -1;
    }
    llama_pos res = -1;
    for (const auto & cl : layers) {
        for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
            for (uint32_t s = 0; s < cl.n_used[h]; ++s) {
                const llama_pos p = cl.pos[cl.base[h] + s];
                res = res < 0 ? p : std::min(res, p);
            }
        }
    }
    return res;
}

llama_pos llama_kv_cache_cmp::seq_pos_max(llama_seq_id seq_id) const {
    return seq_id == 0 ? pos_max : -1;
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_cache_cmp::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> res;
    for (const auto & [c, buf] : kv_bufs) {
        res[ggml_backend_buffer_get_type(buf.get())] += ggml_backend_buffer_get_size(buf.get());
    }
    return res;
}

void llama_kv_cache_cmp::state_write(llama_io_write_i &, llama_seq_id, llama_state_seq_flags) const {
    throw std::runtime_error("the compressed KV cache cannot be saved");
}

void llama_kv_cache_cmp::state_read(llama_io_read_i &, llama_seq_id, llama_state_seq_flags) {
    throw std::runtime_error("the compressed KV cache cannot be loaded");
}

//
// memory contexts
//

llama_kv_cache_cmp_context::llama_kv_cache_cmp_context(llama_memory_status status) : status(status) {}

llama_kv_cache_cmp_context::llama_kv_cache_cmp_context(llama_kv_cache_cmp * kv) :
    status(LLAMA_MEMORY_STATUS_SUCCESS), kv(kv), plan(kv->apply(nullptr)) {}

llama_kv_cache_cmp_context::llama_kv_cache_cmp_context(llama_kv_cache_cmp * kv, llama_context * lctx) :
    status(kv->has_pending() ? LLAMA_MEMORY_STATUS_SUCCESS : LLAMA_MEMORY_STATUS_NO_UPDATE), kv(kv), lctx(lctx) {}

llama_kv_cache_cmp_context::llama_kv_cache_cmp_context(llama_kv_cache_cmp * kv, std::vector<llama_ubatch> ubatches) :
    status(LLAMA_MEMORY_STATUS_SUCCESS), kv(kv), ubatches(std::move(ubatches)) {}

bool llama_kv_cache_cmp_context::next() {
    GGML_ASSERT(status == LLAMA_MEMORY_STATUS_SUCCESS);
    return ++i_cur < ubatches.size();
}

bool llama_kv_cache_cmp_context::apply() {
    GGML_ASSERT(!llama_memory_status_is_fail(status));

    if (lctx) {
        kv->flush(lctx); // an update: the pending compactions
        return true;
    }
    if (ubatches.empty()) {
        return true; // the worst case: nothing to record
    }
    plan = kv->apply(&ubatches[i_cur]);
    return true;
}

const llama_ubatch & llama_kv_cache_cmp_context::get_ubatch() const {
    GGML_ASSERT(status == LLAMA_MEMORY_STATUS_SUCCESS && i_cur < ubatches.size());
    return ubatches[i_cur];
}

//
// per-ubatch plans and graph pieces
//

llama_kv_cmp_plan llama_kv_cache_cmp::apply(const llama_ubatch * ubatch) {
    llama_kv_cmp_plan plan;

    const size_t n_layers = layers.size();
    const uint32_t n_tokens = ubatch ? ubatch->n_tokens : 1;
    plan.parts.resize(n_layers);
    plan.head0.resize(n_layers);

    uint32_t head0 = 0;
    for (size_t i = 0; i < n_layers; ++i) {
        auto & cl = layers[i];
        plan.head0[i] = head0;
        head0 += cl.n_head_kv;

        for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
            llama_kv_cmp_part p;
            p.h0    = h;
            p.nh    = 1;
            p.base  = cl.base[h];
            p.alloc = cl.alloc[h];
            p.cap   = cl.cap[h];
            p.lead  = cl.leader[h];
            p.written0 = cl.n_written[h];
            if (ubatch == nullptr) {
                // graph reservation: the largest graph this head can produce
                p.ins  = 0;
                p.n_kv = cl.alloc[h];
            } else {
                GGML_ASSERT(cl.n_used[h] + n_tokens <= cl.alloc[h]); // checked in init_batch
                p.ins = cl.n_used[h];
                for (uint32_t j = 0; j < n_tokens; ++j) {
                    cl.pos[cl.base[h] + p.ins + j] = ubatch->pos[j];
                }
                cl.n_used[h] += n_tokens;
                cl.n_written[h] += n_tokens;
                p.n_kv = std::min(cl.alloc[h], GGML_PAD(cl.n_used[h], CMP_N_KV_PAD));
            }
            if (p.lead >= 0) {
                // followers in the same state share one mask: their proximal tokens are the same first and last
                // tokens written (never evicted), so tokens written, held and slots say it all
                uint32_t c = 0;
                for (; c < plan.pod_reps.size(); ++c) {
                    const auto & r  = plan.pod_reps[c];
                    const auto & rl = layers[r.first];
                    if (rl.n_written[r.second] == cl.n_written[h] && rl.n_used[r.second] == cl.n_used[h] && rl.alloc[r.second] == cl.alloc[h]) {
                        break;
                    }
                }
                if (c == plan.pod_reps.size()) {
                    plan.pod_reps.emplace_back((int32_t) i, h);
                }
                p.pod_class = c;
                plan.parts[i].push_back(p); // a follower attends on its own
                continue;
            }
            // a head whose slots, fill and capacity match the previous one's, right after it, joins its part
            // (not while positions are hidden: each head then has its own mask)
            auto & parts = plan.parts[i];
            if (!parts.empty() && !(hide_p0 < hide_p1)) {
                auto & last = parts.back();
                if (last.lead < 0 && last.alloc == p.alloc && last.ins == p.ins && last.cap == p.cap && last.n_kv == p.n_kv &&
                    last.base + last.nh*last.alloc == p.base) {
                    last.nh++;
                    continue;
                }
            }
            parts.push_back(p);
        }
    }

    if (ubatch != nullptr) {
        for (uint32_t j = 0; j < ubatch->n_tokens; ++j) {
            pos_max = std::max(pos_max, ubatch->pos[j]);
        }
    }

    plan.z = 0;
    for (const auto & lp : plan.parts) {
        for (const auto & p : lp) {
            plan.z = std::max(plan.z, p.ins);
        }
    }
    plan.width = 1;
    for (const auto & lp : plan.parts) {
        for (const auto & p : lp) {
            plan.width = std::max(plan.width, plan.z - p.ins + p.n_kv);
        }
    }

    plan.flags = stat_flags;
    plan.epoch = epoch;
    plan.hide  = hide_p0 < hide_p1;
    if (plan.flags != 0) {
        plan.window = std::min(obs_window, n_tokens);

        plan.obs_scale.resize((size_t) head0*plan.window);
        for (size_t i = 0; i < n_layers; ++i) {
            const float d = (float) hparams.n_embd_head_k(layers[i].il);
            for (const auto & p : plan.parts[i]) {
                for (uint32_t h = p.h0; h < p.h0 + p.nh; ++h) {
                    for (uint32_t r = 0; r < plan.window; ++r) {
                        // tokens visible to the observed query r: the kept ones plus the ubatch up to and including it
                        const double n_vis = (double) p.ins + (n_tokens - plan.window + r) + 1;
                        const double k     = (double) p.cap;
                        plan.obs_scale[(size_t) (plan.head0[i] + h)*plan.window + r] =
                            n_vis > k ? (float) std::sqrt(2.0*std::log(n_vis/k)/d) : 1.0f/std::sqrt(d);
                    }
                }
            }
        }
    }

    return plan;
}

// the K or V rows of a part: [n_embd_head, nh, n_kv] with heads `alloc` rows apart
static ggml_tensor * cmp_part_view(ggml_context * ctx, ggml_tensor * t, const llama_kv_cmp_part & p, uint32_t base) {
    const size_t row = t->nb[1];
    return ggml_view_4d(ctx, t, t->ne[0], p.nh, p.n_kv, 1, p.alloc*row, row, ggml_nbytes(t), base*row);
}

// (a part of heads that follow no one: their K regions are their V regions' size, in the same order)
ggml_tensor * llama_kv_cache_cmp::get_k(ggml_context * ctx, int32_t i, const llama_kv_cmp_part & part) const {
    return cmp_part_view(ctx, layers[i].k, part, layers[i].kbase[part.h0]);
}

ggml_tensor * llama_kv_cache_cmp::get_v(ggml_context * ctx, int32_t i, const llama_kv_cmp_part & part) const {
    return cmp_part_view(ctx, layers[i].v, part, part.base);
}

ggml_tensor * llama_kv_cache_cmp::get_k_pod(ggml_context * ctx, int32_t i, const llama_kv_cmp_part & part) const {
    const auto & cl = layers[i];
    GGML_ASSERT(part.nh == 1 && part.lead >= 0);
    const size_t row = cl.k->nb[1];
    return ggml_view_4d(ctx, cl.k, cl.k->ne[0], 1, pod_n_sink + pod_n_recent, 1, row, row, ggml_nbytes(cl.k), cl.kbase[part.h0]*row);
}

// the K row of a follower's token written as the o-th: a sink row, else its place in the recent ring
static uint32_t cmp_pod_krow(uint32_t o, uint32_t n_sink, uint32_t n_recent) {
    return o < n_sink ? o : n_sink + (o - n_sink) % n_recent;
}

// write a ubatch's K or V rows [n_embd_head, n_head_kv, n_tokens] into the rows listed in idxs (I64, one
// per (token, head): idxs[t*n_head_kv + h])
static ggml_tensor * cmp_store_rows(ggml_context * ctx, ggml_tensor * dst, ggml_tensor * cur, ggml_tensor * idxs) {
    GGML_ASSERT(cur->ne[0] == dst->ne[0]);
    const int64_t n_rows = cur->ne[1]*cur->ne[2];
    if (cur->nb[1] != ggml_row_size(cur->type, cur->ne[0]) || cur->nb[2] != cur->ne[1]*cur->nb[1]) {
        cur = ggml_cont(ctx, cur); // a view into a fused QKV projection
    }
    cur = ggml_view_2d(ctx, cur, cur->ne[0], n_rows, cur->nb[1], 0);

    return ggml_set_rows(ctx, dst, cur, idxs);
}

ggml_tensor * llama_kv_cache_cmp::cpy_k(ggml_context * ctx, ggml_tensor * k_cur, ggml_tensor * idxs, int32_t i) const {
    return cmp_store_rows(ctx, layers[i].k, k_cur, idxs);
}

ggml_tensor * llama_kv_cache_cmp::cpy_v(ggml_context * ctx, ggml_tensor * v_cur, ggml_tensor * idxs, int32_t i) const {
    return cmp_store_rows(ctx, layers[i].v, v_cur, idxs);
}

void llama_kv_cache_cmp::set_input_idxs(ggml_tensor * dst, int32_t i, const llama_kv_cmp_plan & plan, bool k_rows) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));
    const auto & cl = layers[i];
    const uint32_t n_head_kv = cl.n_head_kv;
    const int64_t  n_tokens  = dst->ne[0] / n_head_kv;
    int64_t * data = (int64_t *) dst->data;
    for (const auto & p : plan.parts[i]) {
        for (uint32_t j = 0; j < p.nh; ++j) {
            const uint32_t h = p.h0 + j;
            if (k_rows && p.lead >= 0) {
                for (int64_t t = 0; t < n_tokens; ++t) {
                    data[t*n_head_kv + h] = cl.kbase[h] + cmp_pod_krow(p.written0 + (uint32_t) t, pod_n_sink, pod_n_recent);
                }
                continue;
            }
            // the head's first free slot
            const int64_t first = (int64_t) (k_rows ? cl.kbase[h] : cl.base[h]) + p.ins;
            for (int64_t t = 0; t < n_tokens; ++t) {
                data[t*n_head_kv + h] = first + t;
            }
        }
    }
}

// for every own K row of a follower: the slot of the token it holds, or -1 (not written, or no longer recent)
static std::vector<int32_t> cmp_pod_row_slots(const llama_kv_cmp_layer & cl, uint32_t h, uint32_t n_sink, uint32_t n_recent) {
    std::vector<int32_t> res(n_sink + n_recent, -1);
    const uint32_t w = cl.n_written[h];
    const uint32_t n_s = std::min(n_sink, w);
    const uint32_t n_r = std::min(n_recent, w - n_s);
    for (uint32_t o = 0; o < n_s; ++o) {
        res[o] = (int32_t) o;
    }
    for (uint32_t o = w - n_r; o < w; ++o) {
        res[cmp_pod_krow(o, n_sink, n_recent)] = (int32_t) (cl.n_used[h] - (w - o));
    }
    return res;
}

void llama_kv_cache_cmp::set_input_pod_mask(ggml_tensor * dst, const llama_ubatch * ubatch, const llama_kv_cmp_plan & plan, uint32_t c) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer) && dst->type == GGML_TYPE_F32);
    const auto & [i, h] = plan.pod_reps[c];
    const auto & cl = layers[i];
    const int64_t n_own  = pod_n_sink + pod_n_recent;
    const int64_t width  = dst->ne[0];
    const int64_t n_kv   = width - n_own;

    uint32_t n_sink = 0, first_recent = 0;
    pod_proximal(cl, h, n_sink, first_recent);
    const auto row_slot = cmp_pod_row_slots(cl, h, pod_n_sink, pod_n_recent);

    float * data = (float *) dst->data;
    for (int64_t t = 0; t < dst->ne[1]; ++t) {
        float * row = data + t*width;
        const llama_pos p_q = t < (int64_t) ubatch->n_tokens ? ubatch->pos[t] : -1;
        // own keys: proximal tokens the query may see (the ubatch's are causal)
        for (int64_t c0 = 0; c0 < n_own; ++c0) {
            const int32_t s = row_slot[c0];
            row[c0] = s >= 0 && cl.pos[cl.base[h] + s] <= p_q ? 0.0f : -INFINITY;
        }
        // the leader's logits: only the distant slots (they all precede the ubatch)
        for (int64_t j = 0; j < n_kv; ++j) {
            row[n_own + j] = p_q >= 0 && j >= n_sink && j < first_recent ? 0.0f : -INFINITY;
        }
    }
}

void llama_kv_cache_cmp::set_input_pod_vidx(ggml_tensor * dst, int32_t i, uint32_t h) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer) && dst->type == GGML_TYPE_I32);
    const auto & cl = layers[i];
    const int64_t n_own = pod_n_sink + pod_n_recent;
    const auto row_slot = cmp_pod_row_slots(cl, h, pod_n_sink, pod_n_recent);
    int32_t * data = (int32_t *) dst->data;
    for (int64_t c = 0; c < n_own; ++c) {
        data[c] = (int32_t) cl.base[h] + std::max(row_slot[c], 0); // an empty row reads any V row: its column is masked
    }
    for (int64_t j = 0; j < dst->ne[0] - n_own; ++j) {
        data[n_own + j] = (int32_t) (cl.base[h] + j);
    }
}

void llama_kv_cache_cmp::store_vnorm(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * v_cur, ggml_tensor * idxs, int32_t i,
        const llama_kv_cmp_plan & plan) const {
    if (!(plan.flags & (1u << LLAMA_LOCALKV_STAT_VNORM))) {
        return;
    }
    ggml_tensor * dst = layers[i].stats[LLAMA_LOCALKV_STAT_VNORM]; // [1, total]

    ggml_tensor * v = v_cur->type == GGML_TYPE_F32 ? v_cur : ggml_cast(ctx, v_cur, GGML_TYPE_F32);
    if (!ggml_is_contiguous(v)) {
        v = ggml_cont(ctx, v);
    }

    ggml_tensor * n2 = ggml_sum_rows(ctx, ggml_sqr(ctx, v));             // [1, n_head_kv, n_tokens]
    n2 = ggml_reshape_2d(ctx, n2, 1, v_cur->ne[1]*v_cur->ne[2]);        // a row per (token, head), as idxs

    ggml_build_forward_expand(gf, ggml_set_rows(ctx, dst, n2, idxs));
}

ggml_tensor * llama_kv_cache_cmp::build_input_rot(ggml_context * ctx, bool v) const {
    const auto & r = rot[v ? 1 : 0];
    if (r.empty()) {
        return nullptr;
    }
    const int64_t n = (int64_t) std::lround(std::sqrt((double) r.size()));
    ggml_tensor * res = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, n);
    ggml_set_input(res);
    ggml_set_name(res, v ? "attn_inp_v_rot" : "attn_inp_k_rot");
    return res;
}

void llama_kv_cache_cmp::set_input_rot(ggml_tensor * dst, bool v) const {
    const auto & r = rot[v ? 1 : 0];
    GGML_ASSERT(ggml_nelements(dst) == (int64_t) r.size());
    ggml_backend_tensor_set(dst, r.data(), 0, ggml_nbytes(dst));
}

void llama_kv_cache_cmp::build_stats(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * q, ggml_tensor * k,
        ggml_tensor * kq_mask, ggml_tensor * obs_scale, ggml_tensor * ones, float kq_scale, int32_t i, const llama_kv_cmp_part & part,
        const llama_kv_cmp_plan & plan, ggml_tensor * kq_all) const {
    if (plan.flags == 0 || plan.window == 0) {
        return;
    }

    const auto & cl = layers[i];

    const int64_t n_tokens = q->ne[2];
    const int64_t n_head   = q->ne[1]; // the part's query heads
    const int64_t n_kv     = part.n_kv;
    const int64_t w        = plan.window;

    ggml_tensor * kq = nullptr;
    if (kq_all) {
        // a POD follower's logits as its attention uses them ([own proximal keys ; slots]): the last w rows
        kq = ggml_view_3d(ctx, kq_all, kq_all->ne[0], w, n_head, kq_all->nb[1], kq_all->nb[2], (n_tokens - w)*kq_all->nb[1]);
        kq = ggml_cont(ctx, kq);
    } else {
        // the last w queries only: a [n_kv, w, n_head] product, never the full attention matrix
        ggml_tensor * q_obs = ggml_view_3d(ctx, q, q->ne[0], n_head, w, q->nb[1], q->nb[2], (n_tokens - w)*q->nb[2]);
        q_obs = ggml_permute(ctx, q_obs, 0, 2, 1, 3);           // [d, w, n_head]

        ggml_tensor * kp = ggml_permute(ctx, k, 0, 2, 1, 3);    // [d, n_kv, nh]

        kq = ggml_mul_mat(ctx, kp, q_obs);                      // [n_kv, w, n_head]
        ggml_prec_set_acc(kq, GGML_PREC_F32);
    }
    const int64_t n_cols = kq->ne[0];

    ggml_tensor * mask = ggml_view_2d(ctx, kq_mask, n_cols, w, kq_mask->nb[1], (n_tokens - w)*kq_mask->nb[1]);

    // the probabilities of the slots: a follower's columns past its own keys (a proximal slot's there are 0)
    auto slots_of = [&](ggml_tensor * p) {
        return n_cols == n_kv ? p : ggml_cont(ctx, ggml_view_3d(ctx, p, n_kv, p->ne[1], p->ne[2], p->nb[1], p->nb[2], (n_cols - n_kv)*p->nb[0]));
    };

    // rows of the stored statistics: query heads, or KV heads (each the sum of its GQA group)
    const int64_t n_rows = query_heads ? n_head : part.nh;
    const uint32_t group = query_heads ? cl.n_head / cl.n_head_kv : 1;

    // the part's [n_kv, n_rows] block of a persistent statistic: its rows are `alloc` floats apart
    auto stat_view = [&](int32_t s) {
        ggml_tensor * t = cl.stats[s];
        GGML_ASSERT(t != nullptr);
        return ggml_view_2d(ctx, t, n_kv, n_rows, part.alloc*sizeof(float), cmp_stat_offset(cl, group, part.h0, 0)*sizeof(float));
    };
    // sum a contiguous [n_kv, m, n_head] tensor over its m queries, and over each GQA group unless
    // stored per query head -> [n_kv, n_rows]. An out_prod with a column of ones reads the probabilities
    // once, in place; a transposed copy and sum_rows (for a device without out_prod) cost twice as much
    auto sum_queries = [&](ggml_tensor * p, int64_t m) {
        const int64_t per_row = m*(n_head/n_rows);
        ggml_tensor * t = ggml_reshape_3d(ctx, p, n_kv, per_row, n_rows);
        if (cl.out_prod) {
            GGML_ASSERT(ones && ggml_nelements(ones) >= per_row*n_rows); // the graph input makes them for every summed statistic
            ggml_tensor * col = ggml_view_3d(ctx, ones, 1, per_row, n_rows, sizeof(float), per_row*sizeof(float), 0);
            return ggml_reshape_2d(ctx, ggml_out_prod(ctx, t, col), n_kv, n_rows);
        }
        t = ggml_cont(ctx, ggml_permute(ctx, t, 1, 0, 2, 3)); // [m*group, n_kv, n_rows]
        return ggml_reshape_2d(ctx, ggml_sum_rows(ctx, t), n_kv, n_rows);
    };

    const bool want_obs = plan.flags & ((1u << LLAMA_LOCALKV_STAT_OBS) | (1u << LLAMA_LOCALKV_STAT_ACC) |
            (1u << LLAMA_LOCALKV_STAT_LAST) | (1u << LLAMA_LOCALKV_STAT_MAX));

    if (want_obs) {
        ggml_tensor * p = slots_of(ggml_soft_max_ext(ctx, kq, mask, kq_scale, 0.0f));
        // the sum over queries only for the statistics that store it (STAT_MAX alone needs none)
        ggml_tensor * s = plan.flags & ((1u << LLAMA_LOCALKV_STAT_OBS) | (1u << LLAMA_LOCALKV_STAT_ACC)) ? sum_queries(p, w) : nullptr;

        if (plan.flags & (1u << LLAMA_LOCALKV_STAT_OBS)) {
            ggml_build_forward_expand(gf, ggml_cpy(ctx, s, stat_view(LLAMA_LOCALKV_STAT_OBS)));
        }
        if (plan.flags & (1u << LLAMA_LOCALKV_STAT_ACC)) {
            ggml_tensor * acc = stat_view(LLAMA_LOCALKV_STAT_ACC);
            ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_add(ctx, acc, s), stat_view(LLAMA_LOCALKV_STAT_ACC)));
        }
        if (plan.flags & (1u << LLAMA_LOCALKV_STAT_LAST)) {
            ggml_tensor * last = ggml_view_3d(ctx, p, n_kv, 1, n_head, p->nb[1], p->nb[2], (w - 1)*p->nb[1]);
            last = sum_queries(ggml_cont(ctx, last), 1);
            ggml_build_forward_expand(gf, ggml_cpy(ctx, last, stat_view(LLAMA_LOCALKV_STAT_LAST)));
        }
        if (plan.flags & (1u << LLAMA_LOCALKV_STAT_MAX)) {
            // max over the w queries and each GQA group, then the running max. max(a, b) = a + relu(b - a)
            // with ops every backend has; the rows are halved until one is left (the halves overlap by a
            // row when the count is odd, which a max does not mind). ggml's pool_2d would do it in one op,
            // but its CPU kernel is single-threaded and walks columns: it doubled the cost of a replay.
            auto max2 = [&](ggml_tensor * a, ggml_tensor * b) { return ggml_add(ctx, a, ggml_relu(ctx, ggml_sub(ctx, b, a))); };
            int64_t m_rows = w*(n_head/n_rows);
            ggml_tensor * t = ggml_reshape_3d(ctx, p, n_kv, m_rows, n_rows);
            while (m_rows > 1) {
                const int64_t h = (m_rows + 1)/2;
                ggml_tensor * lo = ggml_view_3d(ctx, t, n_kv, h, n_rows, t->nb[1], t->nb[2], 0);
                ggml_tensor * hi = ggml_view_3d(ctx, t, n_kv, h, n_rows, t->nb[1], t->nb[2], (m_rows - h)*t->nb[1]);
                t = max2(lo, hi);
                m_rows = h;
            }
            t = ggml_reshape_2d(ctx, t, n_kv, n_rows);
            ggml_tensor * acc = stat_view(LLAMA_LOCALKV_STAT_MAX);
            ggml_tensor * upd = max2(acc, t);
            ggml_build_forward_expand(gf, ggml_cpy(ctx, upd, stat_view(LLAMA_LOCALKV_STAT_MAX)));
        }
    }

    const uint32_t adaptive = (1u << LLAMA_LOCALKV_STAT_OBS_ADAPTIVE) | (1u << LLAMA_LOCALKV_STAT_ACC_ADAPTIVE);

    if ((plan.flags & adaptive) && obs_scale) {
        // one scale per observed query row, in place of kq_scale (the heads of a part share their capacity)
        const size_t off = (size_t) (plan.head0[i] + part.h0)*w;
        ggml_tensor * scale = ggml_view_3d(ctx, obs_scale, 1, w, 1, obs_scale->nb[0], obs_scale->nb[0]*w, off*obs_scale->nb[0]);
        ggml_tensor * p = slots_of(ggml_soft_max_ext(ctx, ggml_mul(ctx, kq, scale), mask, 1.0f, 0.0f));
        ggml_tensor * s = sum_queries(p, w);

        if (plan.flags & (1u << LLAMA_LOCALKV_STAT_OBS_ADAPTIVE)) {
            ggml_build_forward_expand(gf, ggml_cpy(ctx, s, stat_view(LLAMA_LOCALKV_STAT_OBS_ADAPTIVE)));
        }
        if (plan.flags & (1u << LLAMA_LOCALKV_STAT_ACC_ADAPTIVE)) {
            ggml_tensor * acc = stat_view(LLAMA_LOCALKV_STAT_ACC_ADAPTIVE);
            ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_add(ctx, acc, s), stat_view(LLAMA_LOCALKV_STAT_ACC_ADAPTIVE)));
        }
    }
}

void llama_kv_cache_cmp::set_input_kq_mask(ggml_tensor * dst, const llama_ubatch * ubatch, const llama_kv_cmp_plan & plan) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));

    const int64_t width    = dst->ne[0];
    const int64_t n_rows   = dst->ne[1];
    const int64_t n_tokens = ubatch->n_tokens;

    GGML_ASSERT(width == (int64_t) plan.width);

    // columns [0, z): kept tokens, visible to all; [z, z + n_tokens): the ubatch, causal; the rest: empty slots
    auto value = [&](int64_t i, int64_t c) -> float {
        if (i >= n_tokens) {
            return -INFINITY;
        }
        if (c < (int64_t) plan.z) {
            return 0.0f;
        }
        return c - (int64_t) plan.z <= i ? 0.0f : -INFINITY;
    };

    for (int64_t i = 0; i < n_rows; ++i) {
        for (int64_t c = 0; c < width; ++c) {
            const float v = value(i, c);
            if (dst->type == GGML_TYPE_F16) {
                ((ggml_fp16_t *) dst->data)[i*width + c] = ggml_fp32_to_fp16(v);
            } else {
                ((float *) dst->data)[i*width + c] = v;
            }
        }
    }
}

void llama_kv_cache_cmp::set_hidden(llama_pos p0, llama_pos p1) {
    hide_p0 = p0;
    hide_p1 = p1;
}

void llama_kv_cache_cmp::set_input_hidden(ggml_tensor * dst, int32_t i) const {
    const auto & cl = layers[i];
    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_nelements(dst) == (int64_t) cl.total);
    std::vector<float> bias(cl.total, 0.0f);
    for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
        for (uint32_t s = 0; s < cl.n_used[h]; ++s) {
            const llama_pos p = cl.pos[cl.base[h] + s];
            if (p >= hide_p0 && p < hide_p1) {
                bias[cl.base[h] + s] = -INFINITY;
            }
        }
    }
    ggml_backend_tensor_set(dst, bias.data(), 0, ggml_nbytes(dst));
}

void llama_kv_cache_cmp::set_input_obs_scale(ggml_tensor * dst, const llama_kv_cmp_plan & plan) const {
    GGML_ASSERT(ggml_nelements(dst) == (int64_t) plan.obs_scale.size());
    ggml_backend_tensor_set(dst, plan.obs_scale.data(), 0, ggml_nbytes(dst));
}

bool llama_kv_cache_cmp::has_pending() const {
    for (const auto & cl : layers) {
        if (!cl.pending.empty()) {
            return true;
        }
        for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
            if (cl.stale[h] > cl.n_used[h]) {
                return true;
            }
        }
    }
    return false;
}

// kept[h] (ascending, each < n_used[h]) of every head of cached layer i: positions move now, rows at the next flush
void llama_kv_cache_cmp::record_keep(size_t i, const std::vector<std::vector<uint32_t>> & kept) {
    auto & cl = layers[i];
    const uint32_t n_h = cl.n_head_kv;

    // a keep on top of a pending one: compose, so the rows move once, from where they still are
    std::vector<std::vector<uint32_t>> moves(n_h);
    bool identity = cl.pending.empty(); // nothing to move when every head keeps a prefix of what it holds
    for (uint32_t h = 0; h < n_h; ++h) {
        moves[h].resize(kept[h].size());
        for (size_t j = 0; j < kept[h].size(); ++j) {
            moves[h][j] = cl.pending.empty() ? kept[h][j] : cl.pending[h][kept[h][j]];
            identity = identity && moves[h][j] == j;
        }
    }
    cl.pending = identity ? std::vector<std::vector<uint32_t>>() : std::move(moves);

    std::vector<llama_pos> pos(cl.pos.size(), -1);
    for (uint32_t h = 0; h < n_h; ++h) {
        for (size_t j = 0; j < kept[h].size(); ++j) {
            pos[cl.base[h] + j] = cl.pos[cl.base[h] + kept[h][j]];
        }
        cl.stale[h]  = std::max(cl.stale[h], cl.n_used[h]);
        cl.n_used[h] = (uint32_t) kept[h].size();
    }
    cl.pos = std::move(pos);
}

// zero the statistics of freed slots (every one but VNORM, which each write sets), so that a token written
// there later does not start from an evicted token's accumulation; after the compaction moved what is kept
void llama_kv_cache_cmp::zero_stale_stats() {
    for (auto & cl : layers) {
        for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
            if (cl.stale[h] <= cl.n_used[h]) {
                continue;
            }
            for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
                if (!cl.stats[s] || s == LLAMA_LOCALKV_STAT_VNORM) {
                    continue;
                }
                const uint32_t r = cmp_stat_group(cl, s, query_heads);
                for (uint32_t g = 0; g < r; ++g) {
                    ggml_backend_tensor_memset(cl.stats[s], 0, (cmp_stat_offset(cl, r, h, g) + cl.n_used[h])*sizeof(float),
                            (size_t) (cl.stale[h] - cl.n_used[h])*sizeof(float));
                }
            }
            cl.stale[h] = 0;
        }
    }
}

// the pending moves of one tensor through the host (a type whose head rows are not whole int32 words)
void llama_kv_cache_cmp::compact_on_host(ggml_tensor * t, const llama_kv_cmp_layer & cl) {
    const size_t row = t->nb[1];
    const bool is_k = t == cl.k;
    for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
        const auto & ph = cl.pending[h];
        if (ph.empty() || (is_k && cl.leader[h] >= 0)) {
            continue; // (a follower's K rows never move: its proximal tokens are never evicted)
        }
        const size_t base = is_k ? cl.kbase[h] : cl.base[h];
        const uint32_t n_src = *std::max_element(ph.begin(), ph.end()) + 1;
        std::vector<uint8_t> buf((size_t) n_src*row);
        ggml_backend_tensor_get(t, buf.data(), base*row, buf.size());
        std::vector<uint8_t> out(ph.size()*row);
        for (size_t j = 0; j < ph.size(); ++j) {
            memcpy(out.data() + j*row, buf.data() + (size_t) ph[j]*row, row);
        }
        ggml_backend_tensor_set(t, out.data(), base*row, out.size());
        transfer_bytes += buf.size() + out.size();
    }
}

// run every pending compaction in one graph on the cache's backend. Per layer, heads are taken in runs of
// equal slots and kept counts (a whole layer under a uniform policy): per run and tensor, one get_rows
// gathers the kept rows of every head of the run (indices [n_keep, heads]) and one cpy writes them to the
// front of each head's region
bool llama_kv_cache_cmp::flush(llama_context * lctx) {
    if (!has_pending()) {
        return false;
    }

    auto * sched = lctx->get_sched();
    ggml_backend_sched_reset(sched);

    auto * res = lctx->get_gf_res_reserve();
    res->reset();

    ggml_context * ctx = res->get_ctx();
    ggml_cgraph  * gf  = res->get_gf();

    // index inputs and their host data, set once the graph is allocated
    std::vector<std::pair<ggml_tensor *, std::vector<int32_t>>> inputs;

    // rows of `row_elems` elements, `heads` blocks of `alloc` rows (block stride alloc*row_stride) from byte `offset`
    auto gather = [&](ggml_tensor * t, int64_t row_elems, size_t row_stride, uint32_t alloc, size_t offset,
            ggml_tensor * idx, uint32_t n_keep) {
        const int64_t heads = idx->ne[1];
        ggml_tensor * src = ggml_view_3d(ctx, t, row_elems, alloc,  heads, row_stride, alloc*row_stride, offset);
        ggml_tensor * got = ggml_get_rows(ctx, src, idx);
        ggml_tensor * dst = ggml_view_3d(ctx, t, row_elems, n_keep, heads, row_stride, alloc*row_stride, offset);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, got, dst));
    };
    // an I32 input [n_keep, rows]: row r lists the slots KV head h0 + r/per_head keeps
    auto index_input = [&](const llama_kv_cmp_layer & cl, uint32_t h0, uint32_t nh, uint32_t per_head, uint32_t n_keep) {
        ggml_tensor * idx = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_keep, (int64_t) nh*per_head);
        ggml_set_input(idx);
        std::vector<int32_t> data((size_t) n_keep*nh*per_head);
        for (uint32_t r = 0; r < nh*per_head; ++r) {
            const auto & ph = cl.pending[h0 + r/per_head];
            std::copy(ph.begin(), ph.end(), data.begin() + (size_t) r*n_keep);
        }
        inputs.emplace_back(idx, std::move(data));
        return idx;
    };

    for (auto & cl : layers) {
        if (cl.pending.empty()) {
            continue;
        }
        for (int kv = 0; kv < 2; ++kv) {
            if (!(kv == 0 ? cl.k_raw : cl.v_raw)) {
                compact_on_host(kv == 0 ? cl.k : cl.v, cl);
            }
        }

        for (uint32_t h0 = 0, nh = 1; h0 < cl.n_head_kv; h0 += nh) {
            const uint32_t alloc  = cl.alloc[h0];
            const uint32_t n_keep = (uint32_t) cl.pending[h0].size();
            for (nh = 1; h0 + nh < cl.n_head_kv && cl.alloc[h0 + nh] == alloc && cl.pending[h0 + nh].size() == n_keep &&
                    (cl.leader[h0 + nh] < 0) == (cl.leader[h0] < 0); ++nh) {
            }
            if (n_keep == 0) {
                continue;
            }

            ggml_tensor * idx = index_input(cl, h0, nh, 1, n_keep);
            for (int kv = 0; kv < 2; ++kv) {
                ggml_tensor * raw = kv == 0 ? cl.k_raw : cl.v_raw;
                if (kv == 0 && cl.leader[h0] >= 0) {
                    continue; // followers' K rows stay where they are
                }
                if (raw) {
                    gather(raw, raw->ne[0], raw->nb[1], alloc, (kv == 0 ? cl.kbase[h0] : cl.base[h0])*raw->nb[1], idx, n_keep);
                }
            }

            // statistics: one float per (slot, row); a query-head row follows its KV head's tokens
            ggml_tensor * idx_q = nullptr;
            for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
                ggml_tensor * t = cl.stats[s];
                if (!t) {
                    continue;
                }
                const uint32_t r = cmp_stat_group(cl, s, query_heads);
                if (r > 1 && !idx_q) {
                    idx_q = index_input(cl, h0, nh, r, n_keep);
                }
                gather(t, 1, sizeof(float), alloc, cmp_stat_offset(cl, r, h0, 0)*sizeof(float), r > 1 ? idx_q : idx, n_keep);
            }
        }

        cl.pending.clear();
    }

    if (inputs.empty()) {
        ggml_backend_sched_synchronize(sched);
        zero_stale_stats();
        return true; // only host fallbacks, or no rows, had to move
    }

    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        throw std::runtime_error("failed to allocate the compressed cache's compaction graph");
    }
    for (const auto & [t, data] : inputs) {
        ggml_backend_tensor_set(t, data.data(), 0, ggml_nbytes(t));
        transfer_bytes += ggml_nbytes(t);
    }
    if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
        throw std::runtime_error("failed to compute the compressed cache's compaction graph");
    }
    ggml_backend_sched_synchronize(sched);
    zero_stale_stats();

    return true;
}

int32_t llama_kv_cache_cmp::keep(int32_t i, const int32_t * slots, const int32_t * n_keep, std::string & err) {
    if (i < 0 || i >= (int32_t) layers.size()) {
        err = "no cached layer " + std::to_string(i);
        return LLAMA_LOCALKV_ERR_LAYER;
    }
    auto & cl = layers[i];
    if (n_keep == nullptr) {
        err = "n_keep is NULL";
        return LLAMA_LOCALKV_ERR_ARG;
    }
    size_t n_slots = 0;
    for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
        if (n_keep[h] < 0 || (uint32_t) n_keep[h] > cl.n_used[h]) {
            err = "n_keep " + std::to_string(n_keep[h]) + " of KV head " + std::to_string(h) + " is outside [0, " +
                std::to_string(cl.n_used[h]) + "]";
            return LLAMA_LOCALKV_ERR_ARG;
        }
        n_slots += n_keep[h];
    }
    if (slots == nullptr && n_slots > 0) {
        err = "slots is NULL";
        return LLAMA_LOCALKV_ERR_ARG;
    }

    std::vector<std::vector<uint32_t>> kept(cl.n_head_kv);
    size_t k = 0;
    for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
        std::vector<uint8_t> seen(cl.n_used[h]);
        kept[h].reserve(n_keep[h]);
        for (int32_t j = 0; j < n_keep[h]; ++j, ++k) {
            const int32_t s = slots[k];
            if (s < 0 || (uint32_t) s >= cl.n_used[h] || seen[s]) {
                err = "slot " + std::to_string(s) + " of KV head " + std::to_string(h) + " is out of range or repeated";
                return LLAMA_LOCALKV_ERR_INDEX;
            }
            seen[s] = 1;
            kept[h].push_back((uint32_t) s);
        }
        // chronological slot order
        std::sort(kept[h].begin(), kept[h].end());

        // POD: a leader's or follower's proximal tokens stay (a follower has no other copy of their keys)
        if (cl.leader[h] >= 0 || cl.leads[h]) {
            uint32_t n_sink = 0, first_recent = 0;
            pod_proximal(cl, h, n_sink, first_recent);
            const size_t n_prox = n_sink + (cl.n_used[h] - first_recent);
            size_t found = 0;
            for (uint32_t s : kept[h]) {
                found += s < n_sink || s >= first_recent;
            }
            if (found != n_prox) {
                err = "KV head " + std::to_string(h) + " of cached layer " + std::to_string(i) + " is in a POD group: it must keep its " +
                    std::to_string(n_prox) + " proximal slots ([0, " + std::to_string(n_sink) + ") and [" + std::to_string(first_recent) +
                    ", " + std::to_string(cl.n_used[h]) + "))";
                return LLAMA_LOCALKV_ERR_INDEX;
            }
        }
    }

    // POD: a follower keeps the tokens its leader holds (keep the leader first, with the same slots)
    for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
        if (cl.leader[h] < 0) {
            continue;
        }
        const auto & lc = layers[cl.leader[h]];
        bool same = lc.n_used[h] == kept[h].size();
        for (size_t j = 0; same && j < kept[h].size(); ++j) {
            same = lc.pos[lc.base[h] + j] == cl.pos[cl.base[h] + kept[h][j]];
        }
        if (!same) {
            err = "KV head " + std::to_string(h) + " of cached layer " + std::to_string(i) + " follows cached layer " +
                std::to_string(cl.leader[h]) + ": it must keep the tokens its leader holds (keep the leader first, the same slots)";
            return LLAMA_LOCALKV_ERR_INDEX;
        }
    }

    record_keep(i, kept);
    pod_dirty = pod_dirty || !pod_leader.empty();

    return LLAMA_LOCALKV_OK;
}

int32_t llama_kv_cache_cmp::get_stat(int32_t i, int32_t stat, bool sum_per_kv_head, float * out, size_t n_out, std::string & err) {
    if (i < 0 || i >= (int32_t) layers.size()) {
        err = "no cached layer " + std::to_string(i);
        return LLAMA_LOCALKV_ERR_LAYER;
    }
    if (stat < 0 || stat >= LLAMA_LOCALKV_STAT_COUNT) {
        err = "no statistic " + std::to_string(stat);
        return LLAMA_LOCALKV_ERR_ARG;
    }
    GGML_ASSERT(!has_pending()); // the caller flushes first
    const auto & cl = layers[i];
    ggml_tensor * t = cl.stats[stat];
    if (!t) {
        err = "statistic " + std::to_string(stat) + " was never switched on (llama_localkv_set_stats)";
        return LLAMA_LOCALKV_ERR_STATE;
    }

    // rows stored per KV head, and rows written per KV head (summed over the stored ones when fewer)
    const uint32_t r   = cmp_stat_group(cl, stat, query_heads);
    const uint32_t per = sum_per_kv_head || stat == LLAMA_LOCALKV_STAT_VNORM ? 1 : cl.n_head / cl.n_head_kv;

    if (per > r) {
        err = "statistics are kept per KV head: read them with sum_per_kv_head, or ask for "
              "LLAMA_LOCALKV_STATS_QUERY_HEADS in llama_localkv_set_stats";
        return LLAMA_LOCALKV_ERR_STATE;
    }
    const size_t n = (size_t) per*cl.used_total();
    if ((out == nullptr && n > 0) || n_out < n) {
        err = "output buffer too small: need " + std::to_string(n) + " floats";
        return LLAMA_LOCALKV_ERR_ARG;
    }

    // only the slots in use cross to the host, a row at a time
    std::fill(out, out + n, 0.0f);
    std::vector<float> row;
    float * dst = out;
    for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
        const uint32_t nu = cl.n_used[h];
        row.resize(nu);
        for (uint32_t g = 0; g < r && nu > 0; ++g) {
            ggml_backend_tensor_get(t, row.data(), cmp_stat_offset(cl, r, h, g)*sizeof(float), nu*sizeof(float));
            transfer_bytes += nu*sizeof(float);
            float * o = dst + (size_t) (g / (r / per))*nu;
            for (uint32_t s = 0; s < nu; ++s) {
                o[s] += row[s];
            }
        }
        dst += (size_t) per*nu;
    }

    return (int32_t) n;
}

int32_t llama_kv_cache_cmp::read_rows(int32_t i, int32_t which, void * out, size_t n_out, std::string & err) {
    if (i < 0 || i >= (int32_t) layers.size()) {
        err = "no cached layer " + std::to_string(i);
        return LLAMA_LOCALKV_ERR_LAYER;
    }
    if (which != 0 && which != 1) {
        err = "which must be 0 (K) or 1 (V)";
        return LLAMA_LOCALKV_ERR_ARG;
    }
    GGML_ASSERT(!has_pending()); // the caller flushes first
    const auto & cl = layers[i];
    ggml_tensor * t = which == 0 ? cl.k : cl.v;
    const size_t row = t->nb[1];
    const size_t n = (size_t) cl.used_total()*row;
    if (out == nullptr && n_out == 0) {
        return (int32_t) row; // a size query
    }
    if (out == nullptr || n_out < n) {
        err = "output buffer too small: need " + std::to_string(n) + " bytes";
        return LLAMA_LOCALKV_ERR_ARG;
    }
    uint8_t * dst = (uint8_t *) out;
    for (uint32_t h = 0; h < cl.n_head_kv; ++h) {
        if (which == 0 && cl.leader[h] >= 0) {
            // a POD follower: the K rows of its proximal slots, zeros for the distant ones (it has no keys for them)
            std::memset(dst, 0, (size_t) cl.n_used[h]*row);
            const auto row_slot = cmp_pod_row_slots(cl, h, pod_n_sink, pod_n_recent);
            for (size_t r = 0; r < row_slot.size(); ++r) {
                if (row_slot[r] >= 0) {
                    ggml_backend_tensor_get(t, dst + (size_t) row_slot[r]*row, (cl.kbase[h] + r)*row, row);
                }
            }
        } else if (cl.n_used[h] > 0) {
            ggml_backend_tensor_get(t, dst, (which == 0 ? cl.kbase[h] : cl.base[h])*row, cl.n_used[h]*row);
        }
        dst += cl.n_used[h]*row;
    }
    return (int32_t) row;
}

//
// the graph: its attention input and the attention of one layer (llm_graph_context members, called from
// the hooks in build_attn_inp_kv and build_attn)
//

void llm_graph_input_attn_kv_cmp::set_input(const llama_ubatch * ubatch) {
    const llama_kv_cache_cmp * kv   = cmctx->get_cache();
    const llama_kv_cmp_plan  & plan = cmctx->get_plan();

    if (self_kq_mask && self_kq_mask->buffer) {
        kv->set_input_kq_mask(self_kq_mask, ubatch, plan);
    }
    if (obs_scale && obs_scale->buffer) {
        kv->set_input_obs_scale(obs_scale, plan);
    }
    for (const auto & [i, idx] : idxs) {
        if (idx->buffer) {
            kv->set_input_idxs(idx, i, plan);
        }
    }
    for (const auto & [i, bias] : hidden) {
        if (bias->buffer) {
            kv->set_input_hidden(bias, i);
        }
    }
    for (const auto & [i, idx] : kidxs) {
        if (idx->buffer) {
            kv->set_input_idxs(idx, i, plan, true);
        }
    }
    for (const auto & [c, mask] : pod_masks) {
        if (mask->buffer) {
            kv->set_input_pod_mask(mask, ubatch, plan, c);
        }
    }
    for (const auto & [key, vidx] : pod_vidx) {
        if (vidx->buffer) {
            kv->set_input_pod_vidx(vidx, key.first, key.second);
        }
    }
    if (self_k_rot && self_k_rot->buffer) {
        kv->set_input_rot(self_k_rot, false);
    }
    if (self_v_rot && self_v_rot->buffer) {
        kv->set_input_rot(self_v_rot, true);
    }
}

bool llm_graph_input_attn_kv_cmp::can_reuse(const llm_graph_params & params) {
    const auto * c = dynamic_cast<const llama_kv_cache_cmp_context *>(params.mctx);
    if (!c) {
        return false;
    }
    cmctx = c;

    // the same per-layer parts, mask offsets and widths, the same statistics, the same storage
    return c->get_plan().signature(params.ubatch.n_tokens) == signature;
}

llm_graph_input_attn_kv * llm_graph_context::build_attn_inp_kv_cmp() const {
    const auto * cmctx = static_cast<const llama_kv_cache_cmp_context *>(mctx);
    const llama_kv_cache_cmp * kv   = cmctx->get_cache();
    const llama_kv_cmp_plan  & plan = cmctx->get_plan();

    auto inp = std::make_unique<llm_graph_input_attn_kv_cmp>(hparams, cparams, cmctx);

    // the mask template every head views at its own column offset (f16 for flash attention)
    inp->self_kq_mask = ggml_new_tensor_4d(ctx0, cparams.flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32, plan.width, ubatch.n_tokens, 1, 1);
    ggml_set_input(inp->self_kq_mask);
    ggml_set_name(inp->self_kq_mask, "attn_inp_kq_mask");
    inp->self_kq_mask_cnv = inp->self_kq_mask;

    inp->signature = plan.signature(ubatch.n_tokens);

    const uint32_t adaptive = (1u << LLAMA_LOCALKV_STAT_OBS_ADAPTIVE) | (1u << LLAMA_LOCALKV_STAT_ACC_ADAPTIVE);
    if (plan.window > 0 && (plan.flags & adaptive)) {
        inp->obs_scale = ggml_new_tensor_1d(ctx0, GGML_TYPE_F32, plan.obs_scale.size());
        ggml_set_input(inp->obs_scale);
        ggml_set_name(inp->obs_scale, "localkv_obs_scale");
    }
    const uint32_t summed = adaptive | (1u << LLAMA_LOCALKV_STAT_OBS) | (1u << LLAMA_LOCALKV_STAT_ACC) | (1u << LLAMA_LOCALKV_STAT_LAST);
    if (plan.window > 0 && (plan.flags & summed)) {
        uint32_t n_head = 0;
        for (const auto & cl : kv->get_layers()) {
            n_head = std::max(n_head, cl.n_head);
        }
        inp->stat_ones = ggml_fill_inplace(ctx0, ggml_new_tensor_1d(ctx0, GGML_TYPE_F32, (int64_t) plan.window*n_head), 1.0f);
        ggml_set_name(inp->stat_ones, "localkv_stat_ones");
    }

    inp->self_k_rot = kv->build_input_rot(ctx0, false);
    inp->self_v_rot = kv->build_input_rot(ctx0, true);

    return (llm_graph_input_attn_kv *) res->add_input(std::move(inp));
}

// store the ubatch after the kept tokens of every head, then attend part by part (a uniform layer is one
// part), each part with its own view of the mask template, and compute the statistics switched on
ggml_tensor * llm_graph_context::build_attn_cmp(
        llm_graph_input_attn_kv_cmp * inp,
        ggml_tensor * q,
        ggml_tensor * k_cur,
        ggml_tensor * v_cur,
        ggml_tensor * kq_b,
        ggml_tensor * sinks,
        ggml_tensor * v_mla,
              float kq_scale,
                int il) const {
    GGML_ASSERT(kq_b == nullptr && v_mla == nullptr); // refused when the cache is enabled

    const llama_kv_cache_cmp * kv   = inp->cmctx->get_cache();
    const llama_kv_cmp_plan  & plan = inp->cmctx->get_plan();
    const int32_t i = kv->layer_index(il);

    ggml_tensor *& idx = inp->idxs[i];
    if (!idx) {
        idx = ggml_new_tensor_1d(ctx0, GGML_TYPE_I64, k_cur->ne[1]*k_cur->ne[2]);
        ggml_set_input(idx);
        ggml_format_name(idx, "localkv_idxs_%d", i);
    }
    // a layer with POD followers writes K through rows of its own (a follower's K region is its proximal ring)
    const auto & cl = kv->get_layers()[i];
    ggml_tensor * kidx = idx;
    if (cl.has_followers()) {
        ggml_tensor *& t = inp->kidxs[i];
        if (!t) {
            t = ggml_new_tensor_1d(ctx0, GGML_TYPE_I64, k_cur->ne[1]*k_cur->ne[2]);
            ggml_set_input(t);
            ggml_format_name(t, "localkv_kidxs_%d", i);
        }
        kidx = t;
    }
    ggml_build_forward_expand(gf, kv->cpy_k(ctx0, k_cur, kidx, i));
    ggml_build_forward_expand(gf, kv->cpy_v(ctx0, v_cur, idx, i));
    kv->store_vnorm(ctx0, gf, v_cur, idx, i, plan);

    ggml_tensor * kq_mask = inp->get_kq_mask();
    ggml_tensor * cur = nullptr;

    // hidden positions: a per-slot bias of this layer, added to each head's view of the template
    ggml_tensor * hidden = nullptr;
    if (plan.hide) {
        ggml_tensor *& h = inp->hidden[i];
        if (!h) {
            h = ggml_new_tensor_1d(ctx0, GGML_TYPE_F32, kv->get_layers()[i].total);
            ggml_set_input(h);
            ggml_format_name(h, "localkv_hidden_%d", i);
        }
        hidden = h;
    }

    const int64_t group = q->ne[1] / k_cur->ne[1];
    for (const auto & part : plan.parts[i]) {
        const bool whole = part.nh == k_cur->ne[1];
        ggml_tensor * q_p = whole ? q : ggml_view_3d(ctx0, q, q->ne[0], part.nh*group, q->ne[2], q->nb[1], q->nb[2], part.h0*group*q->nb[1]);
        ggml_tensor * s_p = whole || !sinks ? sinks : ggml_view_1d(ctx0, sinks, part.nh*group, part.h0*group*sinks->nb[0]);

        // the part's columns of the template: its causal block starts at column z, the part's at ins
        const auto key = std::make_pair(plan.z - part.ins, part.n_kv);
        auto it = inp->kq_masks.find(key);
        if (it == inp->kq_masks.end()) {
            GGML_ASSERT(key.first + key.second <= kq_mask->ne[0]);
            ggml_tensor * m = ggml_view_4d(ctx0, kq_mask, key.second, kq_mask->ne[1], 1, 1,
                    kq_mask->nb[1], kq_mask->nb[2], kq_mask->nb[3], key.first*kq_mask->nb[0]);
            it = inp->kq_masks.emplace(key, ggml_cont(ctx0, m)).first;
        }

        ggml_tensor * mask = it->second;
        if (hidden) {
            GGML_ASSERT(part.nh == 1);
            mask = ggml_add(ctx0, mask, ggml_view_1d(ctx0, hidden, part.n_kv, part.base*hidden->nb[0]));
        }

        if (part.lead >= 0) {
            ggml_tensor * out = build_attn_pod_follower(inp, q_p, s_p, kq_scale, i, part);
            cur = cur ? ggml_concat(ctx0, cur, out, 0) : out;
            continue;
        }

        ggml_tensor * k = kv->get_k(ctx0, i, part);
        ggml_tensor * v = kv->get_v(ctx0, i, part);

        ggml_tensor * out = build_attn_mha(q_p, k, v, nullptr, mask, s_p, nullptr, 0, kq_scale, il, true);
        kv->build_stats(ctx0, gf, q_p, k, mask, inp->obs_scale, inp->stat_ones, kq_scale, i, part, plan);

        // POD: a leading head's logits Q K^T [n_kv, n_tokens, group], computed once for all its followers
        for (uint32_t j = 0; j < part.nh; ++j) {
            if (!cl.leads[part.h0 + j]) {
                continue;
            }
            llama_kv_cmp_part one = part;
            one.h0   = part.h0 + j;
            one.nh   = 1;
            one.base = part.base + j*part.alloc;
            ggml_tensor * q_h = ggml_view_3d(ctx0, q_p, q_p->ne[0], group, q_p->ne[2], q_p->nb[1], q_p->nb[2], j*group*q_p->nb[1]);
            ggml_tensor * k_h = ggml_permute(ctx0, kv->get_k(ctx0, i, one), 0, 2, 1, 3);  // [d, n_kv, 1]
            ggml_tensor * lead = ggml_mul_mat(ctx0, k_h, ggml_permute(ctx0, q_h, 0, 2, 1, 3)); // [n_kv, n_tokens, group]
            ggml_prec_set_acc(lead, GGML_PREC_F32);
            cb(lead, "pod_lead_kq", il);
            inp->pod_logits[{i, one.h0}] = lead;
        }

        cur = cur ? ggml_concat(ctx0, cur, out, 0) : out;
    }

    return cur;
}

// a POD follower head (q: its GQA group's queries [d, group, n_tokens]): one softmax over [own logits of its proximal
// keys ; its leader's logits, proximal and empty columns masked], applied to [V of the proximal tokens ; V of every
// slot]. Not fused: flash attention takes no precomputed logits (llama-kv-compress.h).
ggml_tensor * llm_graph_context::build_attn_pod_follower(
        llm_graph_input_attn_kv_cmp * inp,
        ggml_tensor * q,
        ggml_tensor * sinks,
              float kq_scale,
            int32_t i,
        const llama_kv_cmp_part & part) const {
    const llama_kv_cache_cmp * kv   = inp->cmctx->get_cache();
    const llama_kv_cmp_plan  & plan = inp->cmctx->get_plan();
    const auto & cl = kv->get_layers()[i];
    const int il = cl.il;

    const int64_t n_tokens = q->ne[2];
    const int64_t group    = q->ne[1];
    const int64_t n_own    = kv->pod_sink() + kv->pod_recent();
    const int64_t n_cols   = n_own + part.n_kv;

    auto it = inp->pod_logits.find({part.lead, part.h0});
    GGML_ASSERT(it != inp->pod_logits.end() && it->second->ne[0] == (int64_t) part.n_kv && it->second->ne[1] == n_tokens);

    ggml_tensor * qp  = ggml_permute(ctx0, q, 0, 2, 1, 3);                               // [d, n_tokens, group]
    ggml_tensor * kf  = ggml_permute(ctx0, kv->get_k_pod(ctx0, i, part), 0, 2, 1, 3);    // [d, n_own, 1]
    ggml_tensor * own = ggml_mul_mat(ctx0, kf, qp);                                       // [n_own, n_tokens, group]
    ggml_prec_set_acc(own, GGML_PREC_F32);

    ggml_tensor * kq = ggml_concat(ctx0, own, it->second, 0);                             // [n_cols, n_tokens, group]
    cb(kq, "pod_kq", il);
    if (hparams.attn_soft_cap) {
        kq = ggml_scale(ctx0, ggml_tanh(ctx0, ggml_scale(ctx0, kq, 1.0f/hparams.f_attn_logit_softcapping)), hparams.f_attn_logit_softcapping);
    }

    ggml_tensor *& mask = inp->pod_masks[part.pod_class];
    if (!mask) {
        mask = ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, n_cols, n_tokens);
        ggml_set_input(mask);
        ggml_format_name(mask, "localkv_pod_mask_%u", part.pod_class);
    }
    GGML_ASSERT(mask->ne[0] == n_cols);

    ggml_tensor * p = ggml_soft_max_ext(ctx0, kq, mask, kq_scale, hparams.f_max_alibi_bias);
    ggml_soft_max_add_sinks(p, sinks);

    ggml_tensor *& vidx = inp->pod_vidx[{i, part.h0}];
    if (!vidx) {
        vidx = ggml_new_tensor_1d(ctx0, GGML_TYPE_I32, n_cols);
        ggml_set_input(vidx);
        ggml_format_name(vidx, "localkv_pod_vidx_%d_%u", i, part.h0);
    }
    ggml_tensor * v  = ggml_get_rows(ctx0, cl.v, vidx);                                   // [d_v, n_cols] f32
    ggml_tensor * vt = ggml_cont(ctx0, ggml_transpose(ctx0, v));                          // [n_cols, d_v]
    ggml_tensor * kqv = ggml_mul_mat(ctx0, vt, p);                                        // [d_v, n_tokens, group]

    kv->build_stats(ctx0, gf, q, nullptr, mask, inp->obs_scale, inp->stat_ones, kq_scale, i, part, plan, kq);

    ggml_tensor * out = ggml_cont_2d(ctx0, ggml_permute(ctx0, kqv, 0, 2, 1, 3), kqv->ne[0]*group, n_tokens);
    cb(out, "pod_kqv", il);
    return out;
}
