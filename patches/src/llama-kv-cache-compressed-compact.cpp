// localkv compressed KV cache, keep and compaction: keep() checks which slots every head keeps and moves their
// positions at once; the rows move later, all pending layers in one ggml graph on the cache's backend (flush).

#include "llama-kv-cache-compressed.h"

#include "llama-context.h"
#include "llama-graph.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

int32_t llama_kv_cache_compressed::keep(int32_t i, const int32_t * slots, const int32_t * n_keep, std::string & err) {
    if (i < 0 || i >= (int32_t) layers.size()) {
        err = "no cached layer " + std::to_string(i);
        return LLAMA_LOCALKV_ERR_LAYER;
    }
    std::vector<std::vector<uint32_t>> kept;
    int32_t rc = kept_slots(i, slots, n_keep, kept, err);
    if (rc != LLAMA_LOCALKV_OK) {
        return rc;
    }
    rc = check_pod_keep_followers(i, kept, err);
    if (rc != LLAMA_LOCALKV_OK) {
        return rc;
    }

    record_keep(i, kept);
    pod_dirty = pod_dirty || !pod_leader.empty();

    return LLAMA_LOCALKV_OK;
}

int32_t llama_kv_cache_compressed::kept_slots(int32_t i, const int32_t * slots, const int32_t * n_keep,
        std::vector<std::vector<uint32_t>> & kept, std::string & err) const {
    const auto & layer = layers[i];
    if (n_keep == nullptr) {
        err = "n_keep is NULL";
        return LLAMA_LOCALKV_ERR_ARG;
    }
    size_t n_slots = 0;
    for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
        if (n_keep[h] < 0 || (uint32_t) n_keep[h] > layer.n_used[h]) {
            err = "n_keep " + std::to_string(n_keep[h]) + " of KV head " + std::to_string(h) + " is outside [0, " +
                std::to_string(layer.n_used[h]) + "]";
            return LLAMA_LOCALKV_ERR_ARG;
        }
        n_slots += n_keep[h];
    }
    if (slots == nullptr && n_slots > 0) {
        err = "slots is NULL";
        return LLAMA_LOCALKV_ERR_ARG;
    }

    kept.assign(layer.n_head_kv, {});
    size_t k = 0;
    for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
        std::vector<uint8_t> seen(layer.n_used[h]);
        kept[h].reserve(n_keep[h]);
        for (int32_t j = 0; j < n_keep[h]; ++j, ++k) {
            const int32_t s = slots[k];
            if (s < 0 || (uint32_t) s >= layer.n_used[h] || seen[s]) {
                err = "slot " + std::to_string(s) + " of KV head " + std::to_string(h) + " is out of range or repeated";
                return LLAMA_LOCALKV_ERR_INDEX;
            }
            seen[s] = 1;
            kept[h].push_back((uint32_t) s);
        }
        // chronological slot order
        std::sort(kept[h].begin(), kept[h].end());

        const int32_t rc = check_pod_keep_proximal(i, h, kept[h], err);
        if (rc != LLAMA_LOCALKV_OK) {
            return rc;
        }
    }
    return LLAMA_LOCALKV_OK;
}

// kept[h] (ascending, each < n_used[h]) of every head of cached layer i: positions move now, rows at the next flush
void llama_kv_cache_compressed::record_keep(size_t i, const std::vector<std::vector<uint32_t>> & kept) {
    auto & layer = layers[i];
    const uint32_t n_head_kv = layer.n_head_kv;

    // a keep on top of a pending one: compose, so the rows move once, from where they still are
    std::vector<std::vector<uint32_t>> moves(n_head_kv);
    bool identity = layer.pending.empty(); // nothing to move when every head keeps a prefix of what it holds
    for (uint32_t h = 0; h < n_head_kv; ++h) {
        moves[h].resize(kept[h].size());
        for (size_t j = 0; j < kept[h].size(); ++j) {
            moves[h][j] = layer.pending.empty() ? kept[h][j] : layer.pending[h][kept[h][j]];
            identity = identity && moves[h][j] == j;
        }
    }
    layer.pending = identity ? std::vector<std::vector<uint32_t>>() : std::move(moves);

    std::vector<llama_pos> pos(layer.pos.size(), -1);
    for (uint32_t h = 0; h < n_head_kv; ++h) {
        for (size_t j = 0; j < kept[h].size(); ++j) {
            pos[layer.base[h] + j] = layer.pos[layer.base[h] + kept[h][j]];
        }
        layer.stale_end[h] = std::max(layer.stale_end[h], layer.n_used[h]);
        layer.n_used[h]    = (uint32_t) kept[h].size();
    }
    layer.pos = std::move(pos);
}

bool llama_kv_cache_compressed::has_pending() const {
    for (const auto & layer : layers) {
        if (!layer.pending.empty()) {
            return true;
        }
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            if (layer.stale_end[h] > layer.n_used[h]) {
                return true;
            }
        }
    }
    return false;
}

// zero the statistics of freed slots (every one but those each write sets: VNORM, SCORE), so that a token written
// there later does not start from an evicted token's accumulation; after the compaction moved what is kept
void llama_kv_cache_compressed::zero_stale_stats() {
    for (auto & layer : layers) {
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            if (layer.stale_end[h] <= layer.n_used[h]) {
                continue;
            }
            for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
                if (!layer.stats[s] || llama_kv_compressed_layer::written_with_token(s)) {
                    continue;
                }
                const uint32_t rows = layer.stat_rows(s, query_heads);
                for (uint32_t g = 0; g < rows; ++g) {
                    ggml_backend_tensor_memset(layer.stats[s], 0, (layer.stat_offset(rows, h, g) + layer.n_used[h])*sizeof(float),
                            (size_t) (layer.stale_end[h] - layer.n_used[h])*sizeof(float));
                }
            }
            layer.stale_end[h] = 0;
        }
    }
}

// the pending moves of one tensor through the host (a type whose head rows are not whole int32 words)
void llama_kv_cache_compressed::compact_on_host(ggml_tensor * t, const llama_kv_compressed_layer & layer) {
    const size_t row = t->nb[1];
    const bool is_k = t == layer.k;
    for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
        const auto & moves = layer.pending[h];
        if (moves.empty() || (is_k && layer.leader[h] >= 0)) {
            continue; // (a follower's K rows never move: its proximal tokens are never evicted)
        }
        const size_t base = is_k ? layer.k_base[h] : layer.base[h];
        const uint32_t n_src = *std::max_element(moves.begin(), moves.end()) + 1;
        std::vector<uint8_t> buf((size_t) n_src*row);
        ggml_backend_tensor_get(t, buf.data(), base*row, buf.size());
        std::vector<uint8_t> out(moves.size()*row);
        for (size_t j = 0; j < moves.size(); ++j) {
            memcpy(out.data() + j*row, buf.data() + (size_t) moves[j]*row, row);
        }
        ggml_backend_tensor_set(t, out.data(), base*row, out.size());
        transfer_bytes += buf.size() + out.size();
    }
}

namespace {

// the compaction graph while it is built: per run of heads and tensor, one get_rows gathers the kept rows of every
// head of the run (indices [n_keep, heads]) and one cpy writes them to the front of each head's region
struct compaction_graph {
    ggml_context * ctx;
    ggml_cgraph  * gf;
    bool query_heads; // how the statistics are stored

    // index inputs and their host data, set once the graph is allocated
    std::vector<std::pair<ggml_tensor *, std::vector<int32_t>>> inputs;

    // rows of `row_elems` elements, `heads` blocks of `alloc` rows (block stride alloc*row_stride) from byte `offset`
    void gather(ggml_tensor * t, int64_t row_elems, size_t row_stride, uint32_t alloc, size_t offset, ggml_tensor * idx,
            uint32_t n_keep) {
        const int64_t heads = idx->ne[1];
        ggml_tensor * src = ggml_view_3d(ctx, t, row_elems, alloc,  heads, row_stride, alloc*row_stride, offset);
        ggml_tensor * got = ggml_get_rows(ctx, src, idx);
        ggml_tensor * dst = ggml_view_3d(ctx, t, row_elems, n_keep, heads, row_stride, alloc*row_stride, offset);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, got, dst));
    }

    // an I32 input [n_keep, rows]: row r lists the slots KV head first + r/per_head keeps
    ggml_tensor * index_input(const llama_kv_compressed_layer & layer, uint32_t first, uint32_t n_heads, uint32_t per_head,
            uint32_t n_keep) {
        ggml_tensor * idx = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_keep, (int64_t) n_heads*per_head);
        ggml_set_input(idx);
        std::vector<int32_t> data((size_t) n_keep*n_heads*per_head);
        for (uint32_t r = 0; r < n_heads*per_head; ++r) {
            const auto & moves = layer.pending[first + r/per_head];
            std::copy(moves.begin(), moves.end(), data.begin() + (size_t) r*n_keep);
        }
        inputs.emplace_back(idx, std::move(data));
        return idx;
    }

    // heads [first, first + n_heads) of `layer`, which keep as many slots of as many: K, V and every statistic
    void compact_run(const llama_kv_compressed_layer & layer, uint32_t first, uint32_t n_heads) {
        const uint32_t alloc  = layer.alloc[first];
        const uint32_t n_keep = (uint32_t) layer.pending[first].size();
        if (n_keep == 0) {
            return;
        }

        ggml_tensor * idx = index_input(layer, first, n_heads, 1, n_keep);
        if (layer.k_raw && layer.leader[first] < 0) { // (followers' K rows stay where they are)
            gather(layer.k_raw, layer.k_raw->ne[0], layer.k_raw->nb[1], alloc, layer.k_base[first]*layer.k_raw->nb[1], idx, n_keep);
        }
        if (layer.v_raw) {
            gather(layer.v_raw, layer.v_raw->ne[0], layer.v_raw->nb[1], alloc, layer.base[first]*layer.v_raw->nb[1], idx, n_keep);
        }

        // statistics: one float per (slot, row); a query-head row follows its KV head's tokens
        ggml_tensor * idx_q = nullptr;
        for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
            ggml_tensor * t = layer.stats[s];
            if (!t) {
                continue;
            }
            const uint32_t rows = layer.stat_rows(s, query_heads);
            if (rows > 1 && !idx_q) {
                idx_q = index_input(layer, first, n_heads, rows, n_keep);
            }
            gather(t, 1, sizeof(float), alloc, layer.stat_offset(rows, first, 0)*sizeof(float), rows > 1 ? idx_q : idx, n_keep);
        }
    }
};

} // namespace

// heads from `first` on with the slots, kept count and POD role of `first` (a whole layer under a uniform policy)
static uint32_t compaction_run_length(const llama_kv_compressed_layer & layer, uint32_t first) {
    uint32_t n = 1;
    while (first + n < layer.n_head_kv && layer.alloc[first + n] == layer.alloc[first] &&
            layer.pending[first + n].size() == layer.pending[first].size() &&
            (layer.leader[first + n] < 0) == (layer.leader[first] < 0)) {
        ++n;
    }
    return n;
}

// run every pending compaction in one graph on the cache's backend, a get_rows and a cpy per run of heads and tensor
bool llama_kv_cache_compressed::flush(llama_context * lctx) {
    if (!has_pending()) {
        return false;
    }

    auto * sched = lctx->get_sched();
    ggml_backend_sched_reset(sched);

    auto * res = lctx->get_gf_res_reserve();
    res->reset();

    compaction_graph graph = { res->get_ctx(), res->get_gf(), query_heads, {} };

    for (auto & layer : layers) {
        if (layer.pending.empty()) {
            continue;
        }
        if (!layer.k_raw) {
            compact_on_host(layer.k, layer);
        }
        if (!layer.v_raw) {
            compact_on_host(layer.v, layer);
        }
        for (uint32_t first = 0, n = 1; first < layer.n_head_kv; first += n) {
            n = compaction_run_length(layer, first);
            graph.compact_run(layer, first, n);
        }
        layer.pending.clear();
    }

    if (!graph.inputs.empty()) {
        if (!ggml_backend_sched_alloc_graph(sched, graph.gf)) {
            throw std::runtime_error("failed to allocate the compressed cache's compaction graph");
        }
        for (const auto & [t, data] : graph.inputs) {
            ggml_backend_tensor_set(t, data.data(), 0, ggml_nbytes(t));
            transfer_bytes += ggml_nbytes(t);
        }
        if (lctx->graph_compute(graph.gf, false) != GGML_STATUS_SUCCESS) {
            throw std::runtime_error("failed to compute the compressed cache's compaction graph");
        }
    } // else only host fallbacks, or no rows, had to move
    ggml_backend_sched_synchronize(sched);
    zero_stale_stats();

    return true;
}
