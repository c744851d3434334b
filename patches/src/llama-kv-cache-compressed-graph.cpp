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
    for (const auto & part : plan.parts[i]) {
        for (uint32_t j = 0; j < part.n_heads; ++j) {
            const uint32_t h = part.first_head + j;
            if (k_rows && part.leader >= 0) {
                for (int64_t t = 0; t < n_tokens; ++t) {
                    data[t*n_head_kv + h] = layer.k_base[h] + pod_k_row(part.n_written + (uint32_t) t);
                }
                continue;
            }
            // the head's first free slot
            const int64_t first = (int64_t) (k_rows ? layer.k_base[h] : layer.base[h]) + part.ubatch_slot;
            for (int64_t t = 0; t < n_tokens; ++t) {
                data[t*n_head_kv + h] = first + t;
            }
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

void llama_kv_cache_compressed::set_input_hidden(ggml_tensor * dst, int32_t i) const {
    const auto & layer = layers[i];
    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_nelements(dst) == (int64_t) layer.total);
    std::vector<float> bias(layer.total, 0.0f);
    for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
        for (uint32_t s = 0; s < layer.n_used[h]; ++s) {
            const llama_pos p = layer.pos[layer.base[h] + s];
            if (p >= hide_p0 && p < hide_p1) {
                bias[layer.base[h] + s] = -INFINITY;
            }
        }
    }
    ggml_backend_tensor_set(dst, bias.data(), 0, ggml_nbytes(dst));
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

// the last w rows of a mask [n_cols, n_tokens]: the observed queries'
static ggml_tensor * observed_mask(ggml_context * ctx, ggml_tensor * mask, int64_t n_tokens, int64_t w) {
    return ggml_view_2d(ctx, mask, mask->ne[0], w, mask->nb[1], (n_tokens - w)*mask->nb[1]);
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
    for (const auto & [i, in] : layers) {
        if (in.v_idxs && in.v_idxs->buffer) {
            kv->set_input_idxs(in.v_idxs, i, plan, false);
        }
        if (in.hidden && in.hidden->buffer) {
            kv->set_input_hidden(in.hidden, i);
        }
        if (in.k_idxs && in.k_idxs->buffer) {
            kv->set_input_idxs(in.k_idxs, i, plan, true);
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

const llm_graph_input_attn_kv_compressed::layer_inputs & llm_graph_input_attn_kv_compressed::get_layer_inputs(
        ggml_context * ctx, int32_t i, const llama_kv_compressed_layer & layer, int64_t n_rows, bool hide) {
    layer_inputs & in = layers[i];
    if (!in.v_idxs) {
        in.v_idxs = new_input_1d(ctx, GGML_TYPE_I64, n_rows);
        ggml_format_name(in.v_idxs, "localkv_idxs_%d", i);
    }
    // a layer with POD followers writes K through rows of its own (a follower's K region is its proximal ring)
    if (!in.k_idxs && layer.has_followers()) {
        in.k_idxs = new_input_1d(ctx, GGML_TYPE_I64, n_rows);
        ggml_format_name(in.k_idxs, "localkv_kidxs_%d", i);
    }
    // hidden positions: a per-slot bias of this layer, added to each head's view of the template
    if (!in.hidden && hide) {
        in.hidden = new_input_1d(ctx, GGML_TYPE_F32, layer.total);
        ggml_format_name(in.hidden, "localkv_hidden_%d", i);
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

// write the ubatch's K and V (and VNORM) into the rows planned for it
static void store_ubatch(const llama_kv_compressed_attn & attn, const llm_graph_input_attn_kv_compressed::layer_inputs & in,
        ggml_tensor * k_cur, ggml_tensor * v_cur) {
    ggml_context * ctx0 = attn.graph.ctx0;
    ggml_cgraph  * gf   = attn.graph.gf;
    ggml_build_forward_expand(gf, attn.kv.cpy_k(ctx0, k_cur, in.k_idxs ? in.k_idxs : in.v_idxs, attn.i));
    ggml_build_forward_expand(gf, attn.kv.cpy_v(ctx0, v_cur, in.v_idxs, attn.i));
    attn.kv.store_vnorm(ctx0, gf, v_cur, in.v_idxs, attn.i, attn.plan);
}

// a part whose heads attend through their own keys (q, sinks: the part's query heads'), and its statistics; the mask
// is the part's view of the template (its causal block lines up with the ubatch's column), plus hidden positions
static ggml_tensor * attn_part(const llama_kv_compressed_attn & attn, const llm_graph_input_attn_kv_compressed::layer_inputs & in,
        ggml_tensor * q, ggml_tensor * sinks, const llama_kv_compressed_part & part) {
    ggml_context * ctx0 = attn.graph.ctx0;

    ggml_tensor * mask = attn.inp.get_kq_mask_view(ctx0, attn.plan.mask_offset(part), part.n_kv);
    if (in.hidden) {
        GGML_ASSERT(part.n_heads == 1);
        mask = ggml_add(ctx0, mask, ggml_view_1d(ctx0, in.hidden, part.n_kv, part.base*in.hidden->nb[0]));
    }

    ggml_tensor * k = attn.kv.get_k(ctx0, attn.i, part);
    ggml_tensor * v = attn.kv.get_v(ctx0, attn.i, part);

    ggml_tensor * out = attn.graph.build_attn_mha(q, k, v, nullptr, mask, sinks, nullptr, 0, attn.kq_scale, attn.il, true);

    if (attn.plan.has_stats()) {
        const int64_t w = attn.plan.window;
        attn.kv.build_stats(ctx0, attn.graph.gf, observed_logits(ctx0, q, k, w), observed_mask(ctx0, mask, q->ne[2], w),
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

    const auto & in = inp->get_layer_inputs(graph.ctx0, i, attn.layer, k_cur->ne[1]*k_cur->ne[2], plan.hide);
    store_ubatch(attn, in, k_cur, v_cur);

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
