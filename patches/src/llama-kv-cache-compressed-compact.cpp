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
    live_dirty = true; // the heads' fills change

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

// a run of consecutive heads of one layer that compact as one: the same slots, kept count and POD role
struct compaction_run {
    size_t   layer   = 0;
    uint32_t first   = 0;
    uint32_t n_heads = 0;
    uint32_t n_keep  = 0;
    bool     move    = false; // rows move (else only freed statistics are cleared)
    bool     clear   = false; // some head freed slots: zero their statistics
    size_t   idx     = 0;     // offset of the run's indices [n_keep, n_heads] in the index input
    size_t   idx_q   = 0;     // ... and of its per-query-head indices [n_keep, n_heads*rows], when a statistic has rows
};

// heads from `first` on with the slots, kept count and POD role of `first` (a whole layer under a uniform policy)
uint32_t compaction_run_length(const llama_kv_compressed_layer & layer, uint32_t first) {
    uint32_t n = 1;
    while (first + n < layer.n_head_kv && layer.alloc[first + n] == layer.alloc[first] &&
            layer.n_used[first + n] == layer.n_used[first] &&
            (layer.leader[first + n] < 0) == (layer.leader[first] < 0)) {
        ++n;
    }
    return n;
}

// the rows of `row_elems` elements of `heads` blocks of `alloc` rows (block stride alloc*row_stride) from byte
// `offset`, the first n of each block
ggml_tensor * blocks(ggml_context * ctx, ggml_tensor * t, int64_t row_elems, size_t row_stride, uint32_t alloc, int64_t heads,
        size_t offset, uint32_t first_row, uint32_t n) {
    return ggml_view_3d(ctx, t, row_elems, n, heads, row_stride, alloc*row_stride, offset + first_row*row_stride);
}

} // namespace

// what a statistic stores per slot row, for its compaction: the float rows of KV head `first` on (a column view)
static size_t stat_byte_offset(const llama_kv_compressed_layer & layer, uint32_t rows, uint32_t first) {
    return layer.stat_offset(rows, first, 0)*sizeof(float);
}

void llama_kv_cache_compressed::attach(llama_context * lctx) {
    owner = lctx;
}

// run every pending compaction in one graph on the context's scheduler, without the worst-case reservation a
// memory update would bring: per run of heads and tensor a get_rows and a cpy move the kept rows to the front, and
// a cpy of zeros clears the freed slots' statistics. Every index of every run goes up in one transfer. The next
// decode builds its graph again (the scheduler was used): the storage epoch changes
bool llama_kv_cache_compressed::flush() {
    if (!has_pending()) {
        return false;
    }
    GGML_ASSERT(owner && "attach() names the context when the cache is enabled");
    owner->synchronize(); // nothing may still read the rows that move

    // the runs, their indices (host), and the largest clear
    std::vector<compaction_run> runs;
    std::vector<int32_t> idx;
    size_t n_zero = 0;
    uint32_t max_rows = 1;
    bool any_stat = false;
    for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
        if (!layers.empty() && layers[0].stats[s]) {
            max_rows = std::max(max_rows, layers[0].stat_rows(s, query_heads));
            any_stat = any_stat || !llama_kv_compressed_layer::written_with_token(s);
        }
    }
    for (size_t i = 0; i < layers.size(); ++i) {
        auto & layer = layers[i];
        const bool move = !layer.pending.empty();
        if (move && !layer.k_raw) {
            compact_on_host(layer.k, layer);
        }
        if (move && !layer.v_raw) {
            compact_on_host(layer.v, layer);
        }
        for (uint32_t first = 0, n = 1; first < layer.n_head_kv; first += n) {
            n = compaction_run_length(layer, first);
            compaction_run run;
            run.layer = i; run.first = first; run.n_heads = n; run.n_keep = layer.n_used[first];
            run.move = move && run.n_keep > 0;
            for (uint32_t h = first; h < first + n; ++h) {
                run.clear = run.clear || (any_stat && layer.stale_end[h] > layer.n_used[h]);
            }
            if (!run.move && !run.clear) {
                continue;
            }
            if (run.move) {
                // [n_keep, heads], then per query head [n_keep, heads*rows]: row r lists KV head first + r/per_head's slots
                for (uint32_t per_head : { 1u, max_rows }) {
                    (per_head == 1 ? run.idx : run.idx_q) = idx.size();
                    for (uint32_t r = 0; r < n*per_head; ++r) {
                        const auto & moves = layer.pending[first + r/per_head];
                        idx.insert(idx.end(), moves.begin(), moves.end());
                    }
                    if (max_rows == 1) {
                        run.idx_q = run.idx;
                        break;
                    }
                }
            }
            if (run.clear) {
                n_zero = std::max(n_zero, (size_t) (layer.alloc[first] - run.n_keep)*n*max_rows);
            }
            runs.push_back(run);
        }
        layer.pending.clear();
        std::fill(layer.stale_end.begin(), layer.stale_end.end(), 0);
    }
    epoch = llama_kv_compressed_next_epoch(); // (also after host fallbacks: no graph is reused across a compaction)
    if (runs.empty()) {
        return true; // only host fallbacks had to move
    }

    const size_t n_nodes = 16*runs.size()*(2 + LLAMA_LOCALKV_STAT_COUNT) + 16;
    ggml_init_params params = { ggml_tensor_overhead()*n_nodes + ggml_graph_overhead_custom(n_nodes, false), nullptr, true };
    ggml_context_ptr ctx_ptr(ggml_init(params));
    ggml_context * ctx = ctx_ptr.get();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_nodes, false);

    ggml_tensor * idx_in = idx.empty() ? nullptr : ggml_new_tensor_1d(ctx, GGML_TYPE_I32, (int64_t) idx.size());
    ggml_tensor * zeros  = n_zero == 0 ? nullptr : ggml_new_tensor_1d(ctx, GGML_TYPE_F32, (int64_t) n_zero);
    for (ggml_tensor * t : { idx_in, zeros }) {
        if (t) {
            ggml_set_input(t);
        }
    }

    // move the first n_keep rows of each block: gather the kept ones, write them to the front
    auto gather = [&](ggml_tensor * t, int64_t row_elems, size_t row_stride, uint32_t alloc, int64_t heads, size_t offset,
            const compaction_run & run, size_t at) {
        ggml_tensor * ids = ggml_view_2d(ctx, idx_in, run.n_keep, heads, run.n_keep*sizeof(int32_t), at*sizeof(int32_t));
        ggml_tensor * got = ggml_get_rows(ctx, blocks(ctx, t, row_elems, row_stride, alloc, heads, offset, 0, alloc), ids);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, got, blocks(ctx, t, row_elems, row_stride, alloc, heads, offset, 0, run.n_keep)));
    };

    for (const auto & run : runs) {
        const auto & layer = layers[run.layer];
        const uint32_t alloc = layer.alloc[run.first];
        if (run.move && layer.k_raw && layer.leader[run.first] < 0) { // (followers' K rows stay where they are)
            gather(layer.k_raw, layer.k_raw->ne[0], layer.k_raw->nb[1], alloc, run.n_heads,
                    layer.k_base[run.first]*layer.k_raw->nb[1], run, run.idx);
        }
        if (run.move && layer.v_raw) {
            gather(layer.v_raw, layer.v_raw->ne[0], layer.v_raw->nb[1], alloc, run.n_heads, layer.base[run.first]*layer.v_raw->nb[1],
                    run, run.idx);
        }
        // statistics: one float per (slot, row); a query-head row follows its KV head's tokens
        for (int32_t s = 0; s < LLAMA_LOCALKV_STAT_COUNT; ++s) {
            ggml_tensor * t = layer.stats[s];
            if (!t) {
                continue;
            }
            const uint32_t rows = layer.stat_rows(s, query_heads);
            const int64_t heads = (int64_t) run.n_heads*rows;
            const size_t offset = stat_byte_offset(layer, rows, run.first);
            if (run.move) {
                gather(t, 1, sizeof(float), alloc, heads, offset, run, rows > 1 ? run.idx_q : run.idx);
            }
            if (run.clear && !llama_kv_compressed_layer::written_with_token(s) && run.n_keep < alloc) {
                const uint32_t n_free = alloc - run.n_keep;
                ggml_tensor * z = ggml_view_3d(ctx, zeros, 1, n_free, heads, sizeof(float), n_free*sizeof(float), 0);
                ggml_build_forward_expand(gf, ggml_cpy(ctx, z, blocks(ctx, t, 1, sizeof(float), alloc, heads, offset, run.n_keep, n_free)));
            }
        }
    }

    ggml_backend_sched_t sched = owner->get_sched();
    ggml_backend_sched_reset(sched);
    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        throw std::runtime_error("failed to allocate the compressed cache's compaction graph");
    }
    if (idx_in) {
        ggml_backend_tensor_set(idx_in, idx.data(), 0, ggml_nbytes(idx_in));
        transfers++;
        transfer_bytes += ggml_nbytes(idx_in);
    }
    if (zeros) {
        const std::vector<float> z(n_zero, 0.0f);
        ggml_backend_tensor_set(zeros, z.data(), 0, ggml_nbytes(zeros));
        transfers++;
        transfer_bytes += ggml_nbytes(zeros);
    }
    if (owner->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
        throw std::runtime_error("failed to compute the compressed cache's compaction graph");
    }
    ggml_backend_sched_synchronize(sched);
    ggml_backend_sched_reset(sched);
    return true;
}
