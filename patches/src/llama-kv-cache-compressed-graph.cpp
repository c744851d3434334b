// localkv compressed KV cache, graph side: the inputs the host fills per ubatch, the attention input and the
// attention of one layer (see llama-kv-cache-compressed-graph.h).

#include "llama-kv-cache-compressed-graph.h"

#include "llama-batch.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <memory>

//
// K, V and the rows a ubatch is written to
//

// the K or V rows of a part: [n_embd_head, n_heads, n_kv] with heads `alloc` rows apart
static ggml_tensor * part_view(ggml_context * ctx, ggml_tensor * t, const llama_kv_compressed_part & part, uint32_t base) {
    const size_t row = t->nb[1];
    return ggml_view_4d(ctx, t, t->ne[0], part.n_heads, part.n_kv, 1, part.alloc*row, row, ggml_nbytes(t), base*row);
}

// (a part of heads that follow no one: their K regions are their V regions' size, in the same order)
ggml_tensor * llama_kv_cache_compressed::get_k(ggml_context * ctx, int32_t i, const llama_kv_compressed_part & part) const {
    return part_view(ctx, layers[i].k, part, layers[i].k_base[part.first_head]);
}

ggml_tensor * llama_kv_cache_compressed::get_v(ggml_context * ctx, int32_t i, const llama_kv_compressed_part & part) const {
    return part_view(ctx, layers[i].v, part, part.base);
}

// the K or V rows of a part as one stream per KV head, the layout upstream's attention takes for its streams:
// [n_embd_head, 1, n_kv, n_heads], stream j at row base + j*alloc
static ggml_tensor * stream_view(ggml_context * ctx, ggml_tensor * t, const llama_kv_compressed_part & part, uint32_t base) {
    const size_t row = t->nb[1];
    return ggml_view_4d(ctx, t, t->ne[0], 1, part.n_kv, part.n_heads, row, row, part.alloc*row, base*row);
}

ggml_tensor * llama_kv_cache_compressed::get_k_streams(ggml_context * ctx, int32_t i, const llama_kv_compressed_part & part) const {
    return stream_view(ctx, layers[i].k, part, layers[i].k_base[part.first_head]);
}

ggml_tensor * llama_kv_cache_compressed::get_v_streams(ggml_context * ctx, int32_t i, const llama_kv_compressed_part & part) const {
    return stream_view(ctx, layers[i].v, part, part.base);
}

// n_kv == alloc, so the part's rows of the live mask are one contiguous block, as flash attention wants its mask
ggml_tensor * llama_kv_cache_compressed::get_live(ggml_context * ctx, ggml_tensor * live, const llama_kv_compressed_part & part) const {
    GGML_ASSERT(part.n_kv == part.alloc);
    const size_t es = ggml_element_size(live);
    return ggml_view_4d(ctx, live, part.n_kv, 1, 1, part.n_heads, part.alloc*es, part.alloc*es, part.alloc*es, part.base*es);
}

// write a ubatch's K or V rows [n_embd_head, n_head_kv, n_tokens] into the rows listed in idxs (I64, one
// per (token, head): idxs[t*n_head_kv + h])
static ggml_tensor * store_rows(ggml_context * ctx, ggml_tensor * dst, ggml_tensor * cur, ggml_tensor * idxs) {
    GGML_ASSERT(cur->ne[0] == dst->ne[0]);
    const int64_t n_rows = cur->ne[1]*cur->ne[2];
    if (cur->nb[1] != ggml_row_size(cur->type, cur->ne[0]) || cur->nb[2] != cur->ne[1]*cur->nb[1]) {
        cur = ggml_cont(ctx, cur); // a view into a fused QKV projection
    }
    cur = ggml_view_2d(ctx, cur, cur->ne[0], n_rows, cur->nb[1], 0);

    return ggml_set_rows(ctx, dst, cur, idxs);
}

ggml_tensor * llama_kv_cache_compressed::cpy_k(ggml_context * ctx, ggml_tensor * k_cur, ggml_tensor * k_idxs, int32_t i) const {
    return store_rows(ctx, layers[i].k, k_cur, k_idxs);
}

ggml_tensor * llama_kv_cache_compressed::cpy_v(ggml_context * ctx, ggml_tensor * v_cur, ggml_tensor * v_idxs, int32_t i) const {
    return store_rows(ctx, layers[i].v, v_cur, v_idxs);
}

void llama_kv_cache_compressed::set_input_idxs(ggml_tensor * dst, int32_t i, const llama_kv_compressed_plan & plan, bool k_rows) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));
    const auto & layer = layers[i];
    const uint32_t n_head_kv = layer.n_head_kv;
    const int64_t  n_tokens  = dst->ne[0] / n_head_kv;
    int64_t * data = (int64_t *) dst->data;
    for (uint32_t h = 0; h < n_head_kv; ++h) {
        if (k_rows && layer.leader[h] >= 0) {
            // a follower's K ring is indexed by the tokens it had written before the ubatch
            const uint32_t n_written = layer.n_written[h] - (uint32_t) n_tokens;
            for (int64_t t = 0; t < n_tokens; ++t) {
                data[t*n_head_kv + h] = layer.k_base[h] + pod_k_row(n_written + (uint32_t) t);
            }
            continue;
        }
        // the head's first free slot
        const int64_t first = (int64_t) (k_rows ? layer.k_base[h] : layer.base[h]) + plan.slot_of(i, h);
        for (int64_t t = 0; t < n_tokens; ++t) {
            data[t*n_head_kv + h] = first + t;
        }
    }
}

//
// masks, rotations, AhaKV's scales
//

void llama_kv_cache_compressed::set_input_kq_mask(ggml_tensor * dst, const llama_ubatch * ubatch, const llama_kv_compressed_plan & plan) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));

    const int64_t width    = dst->ne[0];
    const int64_t n_rows   = dst->ne[1];
    const int64_t n_tokens = ubatch->n_tokens;
    const int64_t column   = plan.ubatch_column;

    GGML_ASSERT(width == (int64_t) plan.width);

    // columns [0, column): kept tokens, visible to all; [column, column + n_tokens): the ubatch, causal; the rest: empty slots
    auto value = [&](int64_t i, int64_t c) -> float {
        if (i >= n_tokens) {
            return -INFINITY;
        }
        if (c < column) {
            return 0.0f;
        }
        return c - column <= i ? 0.0f : -INFINITY;
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

void llama_kv_cache_compressed::set_input_live_rows(ggml_tensor * dst, const llama_ubatch * ubatch) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer) && dst->type == GGML_TYPE_F32);
    const int64_t n_tokens = ubatch->n_tokens;
    const int64_t per_token = ggml_nelements(dst) / n_tokens;
    float * data = (float *) dst->data;
    for (int64_t t = 0; t < n_tokens; ++t) {
        const llama_pos p = ubatch->pos[t];
        std::fill_n(data + t*per_token, per_token, p >= hide_p0 && p < hide_p1 ? -INFINITY : 0.0f);
    }
}

void llama_kv_cache_compressed::set_input_mask_offsets(ggml_tensor * dst, int32_t i, uint32_t first_head,
        const llama_kv_compressed_plan & plan) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer) && dst->type == GGML_TYPE_I32);
    const int64_t n_heads = dst->ne[0];
    int32_t * data = (int32_t *) dst->data;
    for (int64_t t = 0; t < dst->ne[1]; ++t) {
        for (int64_t j = 0; j < n_heads; ++j) {
            data[t*n_heads + j] = (int32_t) plan.mask_offset(i, first_head + (uint32_t) j);
        }
    }
}

ggml_tensor * llama_kv_cache_compressed::build_input_rot(ggml_context * ctx, bool v) const {
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

void llama_kv_cache_compressed::set_input_rot(ggml_tensor * dst, bool v) const {
    const auto & r = rot[v ? 1 : 0];
    GGML_ASSERT(ggml_nelements(dst) == (int64_t) r.size());
    ggml_backend_tensor_set(dst, r.data(), 0, ggml_nbytes(dst));
}

void llama_kv_cache_compressed::set_input_obs_scale(ggml_tensor * dst, const llama_kv_compressed_plan & plan) const {
    GGML_ASSERT(ggml_nelements(dst) == (int64_t) plan.obs_scale.size());
    ggml_backend_tensor_set(dst, plan.obs_scale.data(), 0, ggml_nbytes(dst));
}

// the logits of the last w of a part's queries q [d, n_head, n_tokens] against its keys k [d, n_heads, n_kv]:
// a [n_kv, w, n_head] product, never the full attention matrix
static ggml_tensor * observed_logits(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, int64_t w) {
    const int64_t n_tokens = q->ne[2];
    ggml_tensor * q_obs = ggml_view_3d(ctx, q, q->ne[0], q->ne[1], w, q->nb[1], q->nb[2], (n_tokens - w)*q->nb[2]);
    q_obs = ggml_permute(ctx, q_obs, 0, 2, 1, 3);             // [d, w, n_head]

    ggml_tensor * kq = ggml_mul_mat(ctx, ggml_permute(ctx, k, 0, 2, 1, 3), q_obs); // [n_kv, w, n_head]
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    return kq;
}

//
// the graph input
//

void llm_graph_input_attn_kv_compressed::set_input(const llama_ubatch * ubatch) {
    const llama_kv_cache_compressed * kv   = mctx_compressed->get_cache();
    const llama_kv_compressed_plan  & plan = mctx_compressed->get_plan();

    if (self_kq_mask && self_kq_mask->buffer) {
        kv->set_input_kq_mask(self_kq_mask, ubatch, plan);
    }
    if (obs_scale && obs_scale->buffer) {
        kv->set_input_obs_scale(obs_scale, plan);
    }
    for (const auto & [n_head_kv, rows] : live_rows) {
        if (rows->buffer) {
            kv->set_input_live_rows(rows, ubatch);
        }
    }
    for (const auto & [i, in] : layers) {
        if (in.v_idxs && in.v_idxs->buffer) {
            kv->set_input_idxs(in.v_idxs, i, plan, false);
        }
        if (in.k_idxs && in.k_idxs->buffer) {
            kv->set_input_idxs(in.k_idxs, i, plan, true);
        }
        if (in.distant_rows && in.distant_rows->buffer) {
            kv->set_input_pod_distant(in.distant_rows, in.distant_values, i);
        }
        for (const auto & [first_head, offsets] : in.mask_offsets) {
            if (offsets->buffer) {
                kv->set_input_mask_offsets(offsets, i, first_head, plan);
            }
        }
    }
    for (const auto & [state, mask] : pod_masks) {
        if (mask->buffer) {
            kv->set_input_pod_mask(mask, ubatch, plan, state);
        }
    }
    for (const auto & [key, v_rows] : pod_v_rows) {
        if (v_rows->buffer) {
            kv->set_input_pod_v_rows(v_rows, key.first, key.second);
        }
    }
    if (self_k_rot && self_k_rot->buffer) {
        kv->set_input_rot(self_k_rot, false);
    }
    if (self_v_rot && self_v_rot->buffer) {
        kv->set_input_rot(self_v_rot, true);
    }
}

bool llm_graph_input_attn_kv_compressed::can_reuse(const llm_graph_params & params) {
    const auto * mctx_new = dynamic_cast<const llama_kv_cache_compressed_context *>(params.mctx);
    if (!mctx_new) {
        return false;
    }
    mctx_compressed = mctx_new;

    // the same per-layer parts, mask offsets and widths, the same statistics, the same storage
    return mctx_new->get_plan().signature(params.ubatch.n_tokens) == signature;
}

// a graph input of n elements
static ggml_tensor * new_input_1d(ggml_context * ctx, ggml_type type, int64_t n) {
    ggml_tensor * t = ggml_new_tensor_1d(ctx, type, n);
    ggml_set_input(t);
    return t;
}

llm_graph_input_attn_kv_compressed::layer_inputs & llm_graph_input_attn_kv_compressed::get_layer_inputs(
        ggml_context * ctx, int32_t i, const llama_kv_compressed_layer & layer, int64_t n_rows) {
    layer_inputs & in = layers[i];
    if (!in.v_idxs) {
        in.v_idxs = new_input_1d(ctx, GGML_TYPE_I64, n_rows);
        ggml_format_name(in.v_idxs, "localkv_idxs_%d", i);
    }
    // a layer with POD followers writes K through rows of its own (a follower's K region is its proximal ring), and
    // opens its followers' newly distant slots (n_tokens rows per follower)
    if (!in.k_idxs && layer.has_followers()) {
        in.k_idxs = new_input_1d(ctx, GGML_TYPE_I64, n_rows);
        ggml_format_name(in.k_idxs, "localkv_kidxs_%d", i);
        const int64_t n_followers = std::count_if(layer.leader.begin(), layer.leader.end(), [](int32_t l) { return l >= 0; });
        const int64_t n_tokens = n_rows / layer.n_head_kv;
        in.distant_rows = new_input_1d(ctx, GGML_TYPE_I64, n_followers*n_tokens);
        in.distant_values = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n_followers*n_tokens);
        ggml_set_input(in.distant_values);
        ggml_format_name(in.distant_rows, "localkv_distant_rows_%d", i);
        ggml_format_name(in.distant_values, "localkv_distant_values_%d", i);
    }
    return in;
}

ggml_tensor * llm_graph_input_attn_kv_compressed::get_kq_mask_view(ggml_context * ctx, uint32_t offset, uint32_t n_kv) {
    ggml_tensor *& view = kq_mask_views[{offset, n_kv}];
    if (!view) {
        ggml_tensor * kq_mask = get_kq_mask();
        GGML_ASSERT(offset + n_kv <= kq_mask->ne[0]);
        view = ggml_cont(ctx, ggml_view_4d(ctx, kq_mask, n_kv, kq_mask->ne[1], 1, 1,
                    kq_mask->nb[1], kq_mask->nb[2], kq_mask->nb[3], offset*kq_mask->nb[0]));
    }
    return view;
}

ggml_tensor * llm_graph_input_attn_kv_compressed::get_live_rows(ggml_context * ctx, uint32_t n_head_kv, int64_t n_tokens) {
    ggml_tensor *& rows = live_rows[n_head_kv];
    if (!rows) {
        rows = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, (int64_t) n_head_kv*n_tokens);
        ggml_set_input(rows);
        ggml_format_name(rows, "localkv_live_rows_%u", n_head_kv);
    }
    return rows;
}

ggml_tensor * llm_graph_input_attn_kv_compressed::get_mask_offsets(ggml_context * ctx, int32_t i, uint32_t first_head, uint32_t n_heads,
        int64_t n_tokens) {
    ggml_tensor *& offsets = layers[i].mask_offsets[first_head];
    if (!offsets) {
        offsets = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, n_heads, n_tokens);
        ggml_set_input(offsets);
        ggml_format_name(offsets, "localkv_mask_offsets_%d_%u", i, first_head);
    }
    GGML_ASSERT(offsets->ne[0] == n_heads);
    return offsets;
}

ggml_tensor * llm_graph_input_attn_kv_compressed::get_pod_mask(ggml_context * ctx, uint32_t state, int64_t n_cols, int64_t n_tokens) {
    ggml_tensor *& mask = pod_masks[state];
    if (!mask) {
        mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_cols, n_tokens);
        ggml_set_input(mask);
        ggml_format_name(mask, "localkv_pod_mask_%u", state);
    }
    GGML_ASSERT(mask->ne[0] == n_cols);
    return mask;
}

ggml_tensor * llm_graph_input_attn_kv_compressed::get_pod_v_rows(ggml_context * ctx, int32_t i, uint32_t h, int64_t n_cols) {
    ggml_tensor *& v_rows = pod_v_rows[{i, h}];
    if (!v_rows) {
        v_rows = new_input_1d(ctx, GGML_TYPE_I32, n_cols);
        ggml_format_name(v_rows, "localkv_pod_vidx_%d_%u", i, h);
    }
    return v_rows;
}

//
// the hooks: the attention input, and one layer's store and attention
//

// AhaKV's scales and the ones that sum the observed queries, when a statistic needs them
static void build_stat_inputs(const llm_graph_context & graph, const llama_kv_cache_compressed & kv,
        const llama_kv_compressed_plan & plan, llm_graph_input_attn_kv_compressed & inp) {
    if (plan.window > 0 && (plan.flags & llama_kv_cache_compressed::STATS_ADAPTIVE)) {
        inp.obs_scale = new_input_1d(graph.ctx0, GGML_TYPE_F32, plan.obs_scale.size());
        ggml_set_name(inp.obs_scale, "localkv_obs_scale");
    }
    if (plan.window > 0 && (plan.flags & llama_kv_cache_compressed::STATS_SUMMED)) {
        uint32_t n_head = 0;
        for (const auto & layer : kv.get_layers()) {
            n_head = std::max(n_head, layer.n_head);
        }
        inp.stat_ones = ggml_fill_inplace(graph.ctx0, ggml_new_tensor_1d(graph.ctx0, GGML_TYPE_F32, (int64_t) plan.window*n_head), 1.0f);
        ggml_set_name(inp.stat_ones, "localkv_stat_ones");
    }
}

llm_graph_input_attn_kv * llm_graph_build_attn_inp_kv_compressed(const llm_graph_context & graph) {
    const auto * mctx = static_cast<const llama_kv_cache_compressed_context *>(graph.mctx);
    const llama_kv_cache_compressed & kv   = *mctx->get_cache();
    const llama_kv_compressed_plan  & plan = mctx->get_plan();
    ggml_context * ctx0 = graph.ctx0;

    auto inp = std::make_unique<llm_graph_input_attn_kv_compressed>(graph.hparams, graph.cparams, mctx);

    // the mask template every head views at its own column offset (f16 for flash attention)
    inp->self_kq_mask = ggml_new_tensor_4d(ctx0, graph.cparams.flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32, plan.width,
            graph.ubatch.n_tokens, 1, 1);
    ggml_set_input(inp->self_kq_mask);
    ggml_set_name(inp->self_kq_mask, "attn_inp_kq_mask");
    inp->self_kq_mask_cnv = inp->self_kq_mask;

    inp->signature = plan.signature(graph.ubatch.n_tokens);

    build_stat_inputs(graph, kv, plan, *inp);

    inp->self_k_rot = kv.build_input_rot(ctx0, false);
    inp->self_v_rot = kv.build_input_rot(ctx0, true);

    return (llm_graph_input_attn_kv *) graph.res->add_input(std::move(inp));
}

//
// sliding-window models: the windowed layers' inputs, as upstream's llm_graph_input_attn_kv_iswa fills its *_swa ones
//

void llm_graph_input_attn_kv_iswa_compressed::set_input(const llama_ubatch * ubatch) {
    if (self_k_idxs_swa && self_k_idxs_swa->buffer) {
        windowed->set_input_k_idxs(self_k_idxs_swa, ubatch);
        if (self_v_idxs_swa) {
            windowed->set_input_v_idxs(self_v_idxs_swa, ubatch);
        }
    }
    if (self_kq_mask_swa && self_kq_mask_swa->buffer) {
        windowed->set_input_kq_mask(self_kq_mask_swa, ubatch, cparams.causal_attn);
    }
    if (self_k_rot_swa && self_k_rot_swa->buffer) {
        windowed->set_input_k_rot(self_k_rot_swa);
    }
    if (self_v_rot_swa && self_v_rot_swa->buffer) {
        windowed->set_input_v_rot(self_v_rot_swa);
    }
}

bool llm_graph_input_attn_kv_iswa_compressed::can_reuse(const llm_graph_params & params) {
    const auto * mctx_new = dynamic_cast<const llama_kv_cache_compressed_context *>(params.mctx);
    if (!mctx_new || !mctx_new->get_windowed()) {
        return false;
    }
    windowed = mctx_new->get_windowed();

    // upstream's checks: the same ubatch size and the same window of cells
    bool res = true;
    if (self_k_idxs_swa && self_k_idxs_swa->buffer) {
        res &= self_k_idxs_swa->ne[0] == params.ubatch.n_tokens;
    }
    if (self_kq_mask_swa && self_kq_mask_swa->buffer) {
        const int64_t n_stream = params.cparams.kv_unified ? 1 : params.ubatch.n_seqs_unq;
        res &= self_kq_mask_swa->ne[0] == windowed->get_n_kv();
        res &= self_kq_mask_swa->ne[1] == params.ubatch.n_tokens/n_stream;
        res &= self_kq_mask_swa->ne[2] == 1 && self_kq_mask_swa->ne[3] == n_stream;
    }
    return res;
}

llm_graph_input_attn_kv_iswa * llm_graph_build_attn_inp_kv_iswa_compressed(const llm_graph_context & graph) {
    const auto * mctx = static_cast<const llama_kv_cache_compressed_context *>(graph.mctx);
    const llama_kv_cache_context * windowed = mctx->get_windowed();
    GGML_ASSERT(windowed && "a sliding-window model's compressed cache holds its windowed layers");
    ggml_context * ctx0 = graph.ctx0;

    auto * compressed = static_cast<llm_graph_input_attn_kv_compressed *>(llm_graph_build_attn_inp_kv_compressed(graph));
    auto inp = std::make_unique<llm_graph_input_attn_kv_iswa_compressed>(graph.hparams, graph.cparams, windowed, compressed);

    inp->self_k_idxs_swa = windowed->build_input_k_idxs(ctx0, graph.ubatch);
    inp->self_v_idxs_swa = windowed->build_input_v_idxs(ctx0, graph.ubatch);

    // upstream's mask for the window (f16 for flash attention), one stream
    const int64_t n_stream = graph.cparams.kv_unified ? 1 : graph.ubatch.n_seqs_unq;
    inp->self_kq_mask_swa = ggml_new_tensor_4d(ctx0, graph.cparams.flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32,
            windowed->get_n_kv(), graph.ubatch.n_tokens/n_stream, 1, n_stream);
    ggml_set_input(inp->self_kq_mask_swa);
    ggml_set_name(inp->self_kq_mask_swa, "attn_inp_kq_mask_swa");
    inp->self_kq_mask_swa_cnv = inp->self_kq_mask_swa;

    inp->self_k_rot_swa = windowed->build_input_k_rot(ctx0);
    inp->self_v_rot_swa = windowed->build_input_v_rot(ctx0);

    return (llm_graph_input_attn_kv_iswa *) graph.res->add_input(std::move(inp));
}

// write the ubatch's K and V (and VNORM) into the rows planned for it, and open those rows in the live mask
static void store_ubatch(const llama_kv_compressed_attn & attn, llm_graph_input_attn_kv_compressed::layer_inputs & in,
        ggml_tensor * k_cur, ggml_tensor * v_cur) {
    ggml_context * ctx0 = attn.graph.ctx0;
    ggml_cgraph  * gf   = attn.graph.gf;
    ggml_build_forward_expand(gf, attn.kv.cpy_k(ctx0, k_cur, in.k_idxs ? in.k_idxs : in.v_idxs, attn.i));
    ggml_build_forward_expand(gf, attn.kv.cpy_v(ctx0, v_cur, in.v_idxs, attn.i));
    attn.kv.store_vnorm(ctx0, gf, v_cur, in.v_idxs, attn.i, attn.plan);

    ggml_tensor * rows = attn.inp.get_live_rows(ctx0, attn.layer.n_head_kv, k_cur->ne[2]);
    in.live = ggml_set_rows(ctx0, attn.layer.live, rows, in.v_idxs);
    ggml_build_forward_expand(gf, in.live);

    if (in.distant_rows) {
        in.distant = ggml_set_rows(ctx0, attn.layer.distant, in.distant_values, in.distant_rows);
        ggml_build_forward_expand(gf, in.distant);
    }
}

// every window of n columns of a mask [width, n_tokens] as a row of its own, [n, width - n + 1, n_tokens]: a view
// whose rows overlap, one column apart (ggml_view_3d sizes a view as if its rows did not overlap, so its strides are
// set here; ggml_nbytes, and every backend's get_rows, go by the strides)
static ggml_tensor * column_windows(ggml_context * ctx, ggml_tensor * mask, int64_t n) {
    ggml_tensor * w = ggml_view_1d(ctx, mask, ggml_nelements(mask), 0);
    w->ne[0] = n;
    w->ne[1] = mask->ne[0] - n + 1;
    w->ne[2] = mask->ne[1];
    w->ne[3] = 1;
    w->nb[1] = mask->nb[0];
    w->nb[2] = mask->nb[1];
    w->nb[3] = mask->nb[1]*mask->ne[1];
    GGML_ASSERT(ggml_nbytes(w) <= ggml_nbytes(mask));
    return w;
}

// the masks of a part's heads [n_kv, n_tokens, 1, n_heads or 1] (F16 for flash attention). At decode: the part's
// block of the live mask as it is. In a prefill, heads with one fill share the template's view at their column
// (broadcast over the streams, as upstream's one mask), plus the live mask where positions are hidden; heads with
// different fills take each its own view, gathered with one get_rows (every window of n_kv template columns is a
// row of an overlapping view), plus the live mask
static ggml_tensor * part_mask(const llama_kv_compressed_attn & attn, llm_graph_input_attn_kv_compressed::layer_inputs & in,
        const llama_kv_compressed_part & part, int64_t n_tokens) {
    ggml_context * ctx0 = attn.graph.ctx0;
    ggml_tensor * live = attn.kv.get_live(ctx0, in.live, part);
    if (n_tokens == 1) {
        return live;
    }
    ggml_tensor * tmpl = attn.inp.get_kq_mask(); // [width, n_tokens]
    GGML_ASSERT(tmpl->ne[0] >= (int64_t) part.n_kv && tmpl->ne[1] == n_tokens);
    const bool hide = attn.plan.hide;

    bool one_fill = true;
    for (uint32_t j = 1; j < part.n_heads; ++j) {
        one_fill = one_fill && attn.plan.slot_of(attn.i, part.first_head + j) == attn.plan.slot_of(attn.i, part.first_head);
    }
    if (one_fill) {
        ggml_tensor * mask = attn.inp.get_kq_mask_view(ctx0, attn.plan.mask_offset(attn.i, part.first_head), part.n_kv);
        if (!hide) {
            return mask;
        }
        if (part.n_heads > 1) {
            mask = ggml_repeat_4d(ctx0, mask, part.n_kv, n_tokens, 1, part.n_heads);
        }
        return ggml_add(ctx0, mask, mask->type == live->type ? live : ggml_cast(ctx0, live, mask->type));
    }

    ggml_tensor * windows = column_windows(ctx0, tmpl, part.n_kv);
    ggml_tensor * offsets = attn.inp.get_mask_offsets(ctx0, attn.i, part.first_head, part.n_heads, n_tokens);
    ggml_tensor * mask    = ggml_permute(ctx0, ggml_get_rows(ctx0, windows, offsets), 0, 3, 1, 2); // [n_kv, n_tokens, 1, n_heads] F32
    if (hide) {
        mask = ggml_add(ctx0, mask, ggml_cast(ctx0, live, GGML_TYPE_F32));
    }
    return ggml_cast(ctx0, mask, tmpl->type);
}

// a part whose heads attend through their own keys (q: the part's query heads [d, n_heads*group, n_tokens]; sinks
// only for a single head), and its statistics. Each KV head is a stream of upstream's attention, with its own mask,
// so one call covers the part whatever each head holds
static ggml_tensor * attn_part(const llama_kv_compressed_attn & attn, llm_graph_input_attn_kv_compressed::layer_inputs & in,
        ggml_tensor * q, ggml_tensor * sinks, const llama_kv_compressed_part & part) {
    ggml_context * ctx0 = attn.graph.ctx0;
    const int64_t n_tokens = q->ne[2];
    const int64_t n_heads  = part.n_heads;
    const int64_t group    = q->ne[1] / n_heads;
    GGML_ASSERT(n_heads == 1 || sinks == nullptr);

    ggml_tensor * mask = part_mask(attn, in, part, n_tokens);

    // the queries as streams: [d, group, n_tokens*n_heads], stream j's tokens together (a view at decode)
    ggml_tensor * q_s = q;
    if (n_heads > 1 && n_tokens == 1) {
        q_s = ggml_view_3d(ctx0, q, q->ne[0], group, n_heads, q->nb[1], group*q->nb[1], 0);
    } else if (n_heads > 1) {
        q_s = ggml_view_4d(ctx0, q, q->ne[0], group, n_heads, n_tokens, q->nb[1], group*q->nb[1], q->nb[2], 0);
        q_s = ggml_cont(ctx0, ggml_permute(ctx0, q_s, 0, 1, 3, 2));
        q_s = ggml_reshape_3d(ctx0, q_s, q->ne[0], group, n_tokens*n_heads);
    }

    ggml_tensor * k = attn.kv.get_k_streams(ctx0, attn.i, part);
    ggml_tensor * v = attn.kv.get_v_streams(ctx0, attn.i, part);

    // [d_v*group, n_tokens*n_heads], stream after stream; back to the heads of each token
    ggml_tensor * out = attn.graph.build_attn_mha(q_s, k, v, nullptr, mask, sinks, nullptr, 0, attn.kq_scale, attn.il, true);
    if (n_heads > 1 && n_tokens > 1) {
        out = ggml_reshape_3d(ctx0, out, out->ne[0], n_tokens, n_heads);
        out = ggml_cont_2d(ctx0, ggml_permute(ctx0, out, 0, 2, 1, 3), out->ne[0]*n_heads, n_tokens);
    } else if (n_heads > 1) {
        out = ggml_reshape_2d(ctx0, out, out->ne[0]*n_heads, 1);
    }

    if (attn.plan.has_stats()) {
        const int64_t w = attn.plan.window;
        ggml_tensor * mask_obs = w == n_tokens ? mask : ggml_cont(ctx0, ggml_view_4d(ctx0, mask, mask->ne[0], w, 1, mask->ne[3],
                    mask->nb[1], mask->nb[2], mask->nb[3], (n_tokens - w)*mask->nb[1]));
        attn.kv.build_stats(ctx0, attn.graph.gf, observed_logits(ctx0, q, attn.kv.get_k(ctx0, attn.i, part), w), mask_obs,
                attn.inp.obs_scale, attn.inp.stat_ones, attn.obs_norm, attn.kq_scale, attn.i, part, attn.plan);
    }

    llama_kv_compressed_pod_leader_kq(attn, q, part);

    return out;
}

// the hidden state the layer's attention read, x [n_embd, n_tokens] (after its norm): the input of the K projection
// that produced k_cur, found by walking k_cur's sources (the projection, its bias, reshape, norm, RoPE) back to the
// first matrix product whose input has the model's width. Null if there is none within a few ops (the caller reports
// it): no builder hook is needed, and every architecture that projects K from the hidden state has one
static ggml_tensor * attention_input(ggml_tensor * k_cur, int64_t n_embd, int64_t n_tokens) {
    std::vector<ggml_tensor *> frontier = { k_cur };
    for (int depth = 0; depth < 12 && !frontier.empty(); ++depth) {
        std::vector<ggml_tensor *> next;
        for (ggml_tensor * t : frontier) {
            if (t->op == GGML_OP_MUL_MAT && t->src[1] && t->src[1]->ne[0] == n_embd && t->src[1]->ne[1] == n_tokens &&
                    t->src[1]->ne[2] == 1 && t->src[0]->ne[0] == n_embd) {
                return t->src[1];
            }
            for (int s = 0; s < GGML_MAX_SRC; ++s) {
                // a computed source only: weights, biases and graph inputs (positions, the mask) lead nowhere
                if (t->src[s] && (t->src[s]->op != GGML_OP_NONE || t->src[s]->view_src)) {
                    next.push_back(t->src[s]);
                }
            }
        }
        frontier = std::move(next);
    }
    return nullptr;
}

// ||x_j|| of the ubatch's last w hidden states x [n_embd, n_tokens] -> [1, w]
static ggml_tensor * observed_norms(ggml_context * ctx, ggml_tensor * x, int64_t w) {
    const int64_t n_tokens = x->ne[1];
    ggml_tensor * x_obs = ggml_view_2d(ctx, x, x->ne[0], w, x->nb[1], (n_tokens - w)*x->nb[1]);
    if (x_obs->type != GGML_TYPE_F32) {
        x_obs = ggml_cast(ctx, x_obs, GGML_TYPE_F32);
    }
    return ggml_sqrt(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, ggml_cont(ctx, x_obs))));
}

ggml_tensor * llm_graph_build_attn_compressed(
        const llm_graph_context & graph,
        llm_graph_input_attn_kv_compressed * inp,
        ggml_tensor * q,
        ggml_tensor * k_cur,
        ggml_tensor * v_cur,
        ggml_tensor * kq_b,
        ggml_tensor * sinks,
        ggml_tensor * v_mla,
              float kq_scale,
                int il) {
    GGML_ASSERT(kq_b == nullptr && v_mla == nullptr); // refused when the cache is enabled

    const llama_kv_cache_compressed & kv   = *inp->mctx_compressed->get_cache();
    const llama_kv_compressed_plan  & plan = inp->mctx_compressed->get_plan();
    const int32_t i = kv.layer_index(il);
    llama_kv_compressed_attn attn = { graph, *inp, kv, plan, kv.get_layers()[i], i, il, kq_scale };

    auto & in = inp->get_layer_inputs(graph.ctx0, i, attn.layer, k_cur->ne[1]*k_cur->ne[2]);
    store_ubatch(attn, in, k_cur, v_cur);
    attn.distant = in.distant;

    // what reads the hidden state at the attention's input: the learned scorer, KVzip+'s normed maximum
    if (plan.flags & llama_kv_cache_compressed::STATS_HIDDEN) {
        ggml_tensor * x = attention_input(k_cur, graph.hparams.n_embd, k_cur->ne[2]);
        if (!x) {
            kv.set_hidden_input_missing(il);
        } else {
            kv.store_score(graph.ctx0, graph.gf, x, in.v_idxs, i, plan);
            if (plan.window > 0 && (plan.flags & (1u << LLAMA_LOCALKV_STAT_MAX_NORMED))) {
                attn.obs_norm = observed_norms(graph.ctx0, x, plan.window);
            }
        }
    }

    ggml_context * ctx0 = graph.ctx0;
    const int64_t group = q->ne[1] / k_cur->ne[1];

    ggml_tensor * cur = nullptr;
    for (const auto & part : plan.parts[i]) {
        // the part's query heads and their sinks (all of them when the part is the whole layer)
        const bool whole = part.n_heads == k_cur->ne[1];
        ggml_tensor * q_part = whole ? q :
            ggml_view_3d(ctx0, q, q->ne[0], part.n_heads*group, q->ne[2], q->nb[1], q->nb[2], part.first_head*group*q->nb[1]);
        ggml_tensor * sinks_part = whole || !sinks ? sinks :
            ggml_view_1d(ctx0, sinks, part.n_heads*group, part.first_head*group*sinks->nb[0]);

        ggml_tensor * out = part.leader >= 0 ?
            llama_kv_compressed_attn_pod_follower(attn, q_part, sinks_part, part) :
            attn_part(attn, in, q_part, sinks_part, part);

        cur = cur ? ggml_concat(ctx0, cur, out, 0) : out;
    }

    return cur;
}
