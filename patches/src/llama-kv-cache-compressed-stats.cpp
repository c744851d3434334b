// localkv compressed KV cache, statistics: computed in the graph of every ubatch while switched on (one softmax of
// the observed queries per part at the model's scale, one at AhaKV's), cleared and read back by the C API.
// Their storage (allocated when first asked for) follows the rows' regions: see llama-kv-cache-compressed.h.

#include "llama-kv-cache-compressed.h"

#include "ggml-backend.h"

#include <algorithm>
#include <map>
#include <set>

void llama_kv_cache_compressed::store_vnorm(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * v_cur, ggml_tensor * v_idxs, int32_t i,
        const llama_kv_compressed_plan & plan) const {
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

    ggml_build_forward_expand(gf, ggml_set_rows(ctx, dst, n2, v_idxs));
}

void llama_kv_cache_compressed::store_score(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * x, ggml_tensor * v_idxs, int32_t i,
        const llama_kv_compressed_plan & plan) const {
    if (!(plan.flags & (1u << LLAMA_LOCALKV_STAT_SCORE)) || (size_t) i >= scorers.size() || !scorers[i].w1) {
        return;
    }
    const scorer & sc = scorers[i];
    ggml_tensor * s = ggml_add(ctx, ggml_mul_mat(ctx, sc.w1, x), sc.b1);     // [n_hidden or n_head_kv, n_tokens]
    if (sc.w2) {
        s = ggml_add(ctx, ggml_mul_mat(ctx, sc.w2, ggml_gelu(ctx, s)), sc.b2); // [n_head_kv, n_tokens]
    }
    s = ggml_reshape_2d(ctx, s, 1, s->ne[0]*s->ne[1]);                     // a row per (token, head), as idxs
    ggml_build_forward_expand(gf, ggml_set_rows(ctx, layers[i].stats[LLAMA_LOCALKV_STAT_SCORE], s, v_idxs));
}

namespace {

// the statistics of one part, built from the probabilities of its observed queries: where each is stored, and how
// the observed queries (and the query heads of each GQA group, unless stored per query head) are reduced
struct part_stats {
    ggml_context * ctx;
    ggml_cgraph  * gf;
    const llama_kv_compressed_layer & layer;
    const llama_kv_compressed_part  & part;
    ggml_tensor * ones;  // a column of ones for sum_queries' out_prod
    ggml_tensor * obs_norm; // [1, w]: the observed queries' hidden-state norms (MAX_NORMED)
    uint32_t flags;
    bool     query_heads;
    int64_t  n_head;     // the part's query heads
    int64_t  n_rows;     // rows of the stored statistics: query heads, or KV heads (each the sum of its GQA group)
    int64_t  w;          // observed queries

    bool on(int32_t stat) const { return flags & (1u << stat); }

    // the part's [n_kv, n_rows] block of a persistent statistic: its rows are `alloc` floats apart
    ggml_tensor * view(int32_t stat) const {
        ggml_tensor * t = layer.stats[stat];
        GGML_ASSERT(t != nullptr);
        const size_t offset = layer.stat_offset(layer.stat_rows(stat, query_heads), part.first_head, 0);
        return ggml_view_2d(ctx, t, part.n_kv, n_rows, part.alloc*sizeof(float), offset*sizeof(float));
    }

    void store(int32_t stat, ggml_tensor * value) const {
        ggml_build_forward_expand(gf, ggml_cpy(ctx, value, view(stat)));
    }

    // the probabilities of the slots: a follower's columns past its own keys (a proximal slot's there are 0)
    ggml_tensor * slots(ggml_tensor * p) const {
        const int64_t n_kv = part.n_kv;
        return p->ne[0] == n_kv ? p : ggml_cont(ctx, ggml_view_3d(ctx, p, n_kv, p->ne[1], p->ne[2], p->nb[1], p->nb[2],
                    (p->ne[0] - n_kv)*p->nb[0]));
    }

    // sum a contiguous [n_kv, m, n_head] tensor over its m queries, and over each GQA group unless stored per query
    // head -> [n_kv, n_rows]. An out_prod with a column of ones reads the probabilities once, in place; a transposed
    // copy and sum_rows (for a device without out_prod) cost twice as much
    ggml_tensor * sum_queries(ggml_tensor * p, int64_t m) const {
        const int64_t n_kv    = part.n_kv;
        const int64_t per_row = m*(n_head/n_rows);
        ggml_tensor * t = ggml_reshape_3d(ctx, p, n_kv, per_row, n_rows);
        if (layer.out_prod) {
            GGML_ASSERT(ones && ggml_nelements(ones) >= per_row*n_rows); // the graph input makes them for every summed statistic
            ggml_tensor * col = ggml_view_3d(ctx, ones, 1, per_row, n_rows, sizeof(float), per_row*sizeof(float), 0);
            return ggml_reshape_2d(ctx, ggml_out_prod(ctx, t, col), n_kv, n_rows);
        }
        t = ggml_cont(ctx, ggml_permute(ctx, t, 1, 0, 2, 3)); // [m*group, n_kv, n_rows]
        return ggml_reshape_2d(ctx, ggml_sum_rows(ctx, t), n_kv, n_rows);
    }

    // max(a, b) = a + relu(b - a), with ops every backend has
    ggml_tensor * max2(ggml_tensor * a, ggml_tensor * b) const {
        return ggml_add(ctx, a, ggml_relu(ctx, ggml_sub(ctx, b, a)));
    }

    // the max of a contiguous [n_kv, w, n_head] tensor over the w queries and each GQA group -> [n_kv, n_rows]. The rows
    // are halved until one is left (the halves overlap by a row when the count is odd, which a max does not mind).
    // ggml's pool_2d would do it in one op, but its CPU kernel is single-threaded and walks columns: it doubled the
    // cost of a replay.
    ggml_tensor * max_queries(ggml_tensor * p) const {
        const int64_t n_kv = part.n_kv;
        int64_t m_rows = w*(n_head/n_rows);
        ggml_tensor * t = ggml_reshape_3d(ctx, p, n_kv, m_rows, n_rows);
        while (m_rows > 1) {
            const int64_t half = (m_rows + 1)/2;
            ggml_tensor * lo = ggml_view_3d(ctx, t, n_kv, half, n_rows, t->nb[1], t->nb[2], 0);
            ggml_tensor * hi = ggml_view_3d(ctx, t, n_kv, half, n_rows, t->nb[1], t->nb[2], (m_rows - half)*t->nb[1]);
            t = max2(lo, hi);
            m_rows = half;
        }
        return ggml_reshape_2d(ctx, t, n_kv, n_rows);
    }

    // a sum over the observed queries: stored as is (stat_obs) and added to a running sum (stat_acc), each if on
    void store_sum(int32_t stat_obs, int32_t stat_acc, ggml_tensor * sum) const {
        if (on(stat_obs)) {
            store(stat_obs, sum);
        }
        if (on(stat_acc)) {
            store(stat_acc, ggml_add(ctx, view(stat_acc), sum));
        }
    }

    // OBS, ACC, LAST and MAX from the softmax at the model's scale [n_cols, w, n_head]
    void build_plain(ggml_tensor * probs) const {
        ggml_tensor * p = slots(probs);
        // the sum over queries only for the statistics that store it (STAT_MAX alone needs none)
        ggml_tensor * sum = on(LLAMA_LOCALKV_STAT_OBS) || on(LLAMA_LOCALKV_STAT_ACC) ? sum_queries(p, w) : nullptr;
        store_sum(LLAMA_LOCALKV_STAT_OBS, LLAMA_LOCALKV_STAT_ACC, sum);

        if (on(LLAMA_LOCALKV_STAT_LAST)) {
            ggml_tensor * last = ggml_view_3d(ctx, p, part.n_kv, 1, n_head, p->nb[1], p->nb[2], (w - 1)*p->nb[1]);
            store(LLAMA_LOCALKV_STAT_LAST, sum_queries(ggml_cont(ctx, last), 1));
        }
        if (on(LLAMA_LOCALKV_STAT_MAX)) {
            store(LLAMA_LOCALKV_STAT_MAX, max2(view(LLAMA_LOCALKV_STAT_MAX), max_queries(p)));
        }
        if (on(LLAMA_LOCALKV_STAT_MAX_NORMED) && obs_norm) {
            // each query's row over its hidden state's norm (broadcast over slots and heads), then the running max
            ggml_tensor * scaled = ggml_div(ctx, p, ggml_reshape_3d(ctx, obs_norm, 1, w, 1));
            store(LLAMA_LOCALKV_STAT_MAX_NORMED, max2(view(LLAMA_LOCALKV_STAT_MAX_NORMED), max_queries(scaled)));
        }
    }

    // OBS_ADAPTIVE and ACC_ADAPTIVE from the softmax at AhaKV's scales [n_cols, w, n_head]
    void build_adaptive(ggml_tensor * probs) const {
        store_sum(LLAMA_LOCALKV_STAT_OBS_ADAPTIVE, LLAMA_LOCALKV_STAT_ACC_ADAPTIVE, sum_queries(slots(probs), w));
    }
};

} // namespace

void llama_kv_cache_compressed::build_stats(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * kq_obs, ggml_tensor * mask_obs,
        ggml_tensor * obs_scale, ggml_tensor * ones, ggml_tensor * obs_norm, float kq_scale, int32_t i,
        const llama_kv_compressed_part & part, const llama_kv_compressed_plan & plan) const {
    const int64_t n_head = kq_obs->ne[2];
    const int64_t w      = plan.window;
    const part_stats stats = { ctx, gf, layers[i], part, ones, obs_norm, plan.flags, query_heads, n_head,
        query_heads ? n_head : (int64_t) part.n_heads, w };

    // the logits by KV head [n_cols, w, group, n_heads], as the masks come ([n_cols, w, 1, n_heads], or one for the part)
    const int64_t n_heads = part.n_heads;
    ggml_tensor * kq_heads = ggml_reshape_4d(ctx, kq_obs, kq_obs->ne[0], w, n_head/n_heads, n_heads);
    auto softmax = [&](ggml_tensor * kq, float scale) {
        ggml_tensor * p = ggml_soft_max_ext(ctx, kq, mask_obs, scale, 0.0f);
        return ggml_reshape_3d(ctx, p, kq_obs->ne[0], w, n_head);
    };

    if (plan.flags & STATS_PLAIN) {
        stats.build_plain(softmax(kq_heads, kq_scale));
    }
    if ((plan.flags & STATS_ADAPTIVE) && obs_scale) {
        // one scale per observed query row of each KV head (its own fill and capacity), in place of kq_scale
        const size_t es  = obs_scale->nb[0];
        const size_t off = (size_t) (plan.head_offset[i] + part.first_head)*w;
        ggml_tensor * scale = ggml_view_4d(ctx, obs_scale, 1, w, 1, n_heads, es, es*w, es*w, off*es);
        stats.build_adaptive(softmax(ggml_mul(ctx, kq_heads, scale), 1.0f));
    }
}

//
// clearing and reading (the C API)
//

int32_t llama_kv_cache_compressed::clear_stat(int32_t stat, std::string & err) {
    if (stat < 0 || stat >= LLAMA_LOCALKV_STAT_COUNT) {
        err = "no statistic " + std::to_string(stat);
        return LLAMA_LOCALKV_ERR_ARG;
    }
    // every layer of a device is one block
    std::set<ggml_tensor *> blocks;
    for (auto & layer : layers) {
        if (layer.stats[stat] && blocks.insert(layer.stats[stat]->view_src).second) {
            ggml_backend_tensor_memset(layer.stats[stat]->view_src, 0, 0, ggml_nbytes(layer.stats[stat]->view_src));
            transfers++;
        }
    }
    return LLAMA_LOCALKV_OK;
}

// the slots in use of statistic `stat` of `layer` from its block (`block`: the layer's floats as stored), head after
// head, `out_rows` rows per KV head (each the sum of the stored rows it covers); returns the floats written
static size_t copy_used(const llama_kv_compressed_layer & layer, uint32_t rows, uint32_t out_rows, const float * block, float * out) {
    float * dst = out;
    for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
        const uint32_t n_used = layer.n_used[h];
        std::fill(dst, dst + (size_t) out_rows*n_used, 0.0f);
        for (uint32_t g = 0; g < rows; ++g) {
            const float * src = block + layer.stat_offset(rows, h, g);
            float * o = dst + (size_t) (g / (rows / out_rows))*n_used;
            for (uint32_t s = 0; s < n_used; ++s) {
                o[s] += src[s];
            }
        }
        dst += (size_t) out_rows*n_used;
    }
    return (size_t) (dst - out);
}

// rows written per KV head of `layer` (summed over the stored ones when fewer)
static uint32_t out_rows_of(const llama_kv_compressed_layer & layer, int32_t stat, bool sum_per_kv_head) {
    return sum_per_kv_head || llama_kv_compressed_layer::written_with_token(stat) ? 1 : layer.n_head / layer.n_head_kv;
}

int32_t llama_kv_cache_compressed::check_stat(int32_t stat, bool sum_per_kv_head, std::string & err) const {
    if (stat < 0 || stat >= LLAMA_LOCALKV_STAT_COUNT) {
        err = "no statistic " + std::to_string(stat);
        return LLAMA_LOCALKV_ERR_ARG;
    }
    GGML_ASSERT(!has_pending()); // the caller flushes first
    if (hidden_input_missing >= 0 && ((1u << stat) & STATS_HIDDEN)) {
        err = "statistic " + std::to_string(stat) + " reads the attention's input, which the graph of layer " +
            std::to_string(hidden_input_missing) + " of this model does not show (no K projection of the hidden state)";
        return LLAMA_LOCALKV_ERR_UNSUPPORTED;
    }
    if (!layers.empty() && !layers[0].stats[stat]) {
        err = "statistic " + std::to_string(stat) + " was never switched on (llama_localkv_set_stats)";
        return LLAMA_LOCALKV_ERR_STATE;
    }
    for (const auto & layer : layers) {
        if (out_rows_of(layer, stat, sum_per_kv_head) > layer.stat_rows(stat, query_heads)) {
            err = "statistics are kept per KV head: read them with sum_per_kv_head, or ask for "
                  "LLAMA_LOCALKV_STATS_QUERY_HEADS in llama_localkv_set_stats";
            return LLAMA_LOCALKV_ERR_STATE;
        }
    }
    return LLAMA_LOCALKV_OK;
}

int32_t llama_kv_cache_compressed::get_stat(int32_t i, int32_t stat, bool sum_per_kv_head, float * out, size_t n_out, std::string & err) {
    if (i < 0 || i >= (int32_t) layers.size()) {
        err = "no cached layer " + std::to_string(i);
        return LLAMA_LOCALKV_ERR_LAYER;
    }
    const int32_t rc = check_stat(stat, sum_per_kv_head, err);
    if (rc != LLAMA_LOCALKV_OK) {
        return rc;
    }
    const auto & layer = layers[i];
    const uint32_t out_rows = out_rows_of(layer, stat, sum_per_kv_head);
    const size_t n = (size_t) out_rows*layer.used_total();
    if ((out == nullptr && n > 0) || n_out < n) {
        err = "output buffer too small: need " + std::to_string(n) + " floats";
        return LLAMA_LOCALKV_ERR_ARG;
    }
    // the layer's block in one transfer, then the slots in use
    ggml_tensor * t = layer.stats[stat];
    std::vector<float> block(ggml_nelements(t));
    ggml_backend_tensor_get(t, block.data(), 0, ggml_nbytes(t));
    transfers++;
    transfer_bytes += ggml_nbytes(t);
    copy_used(layer, layer.stat_rows(stat, query_heads), out_rows, block.data(), out);
    return (int32_t) n;
}

int64_t llama_kv_cache_compressed::get_stats(int32_t stat, bool sum_per_kv_head, float * out, size_t n_out, std::string & err) {
    const int32_t rc = check_stat(stat, sum_per_kv_head, err);
    if (rc != LLAMA_LOCALKV_OK) {
        return rc;
    }
    size_t n = 0;
    for (const auto & layer : layers) {
        n += (size_t) out_rows_of(layer, stat, sum_per_kv_head)*layer.used_total();
    }
    if ((out == nullptr && n > 0) || n_out < n) {
        err = "output buffer too small: need " + std::to_string(n) + " floats";
        return LLAMA_LOCALKV_ERR_ARG;
    }
    // every layer of a device is one block: one transfer per device, then the slots in use layer after layer
    std::map<const ggml_tensor *, std::vector<float>> blocks;
    float * dst = out;
    for (const auto & layer : layers) {
        const ggml_tensor * t = layer.stats[stat];
        auto it = blocks.find(t->view_src);
        if (it == blocks.end()) {
            it = blocks.emplace(t->view_src, std::vector<float>(ggml_nelements(t->view_src))).first;
            ggml_backend_tensor_get(t->view_src, it->second.data(), 0, ggml_nbytes(t->view_src));
            transfers++;
            transfer_bytes += ggml_nbytes(t->view_src);
        }
        dst += copy_used(layer, layer.stat_rows(stat, query_heads), out_rows_of(layer, stat, sum_per_kv_head),
                it->second.data() + t->view_offs/sizeof(float), dst);
    }
    return (int64_t) n;
}
