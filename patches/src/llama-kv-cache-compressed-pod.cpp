// localkv compressed KV cache, POD: leaders and followers (the layout is described in llama-kv-cache-compressed.h).
// Setting and checking a POD layout, a follower's proximal tokens and K ring, its inputs (mask, V rows) and its
// attention, which borrows its leader's logits for the distant tokens.

#include "llama-kv-cache-compressed-graph.h"

#include "llama-batch.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cmath>

//
// the layout
//

// a POD layout: every follower follows an earlier layer's same KV head, which leads (follows no one), with the
// same capacity and slots (the leader's logits cover the follower's slots column for column)
int32_t llama_kv_cache_compressed::check_pod_layout(const std::vector<int32_t> & leader, const uint32_t * capacities, const uint32_t * slots,
        std::string & err) const {
    if (leader.empty()) {
        return LLAMA_LOCALKV_OK;
    }
    std::vector<size_t> head_offset(layers.size() + 1, 0);
    for (size_t i = 0; i < layers.size(); ++i) {
        head_offset[i + 1] = head_offset[i] + layers[i].n_head_kv;
    }
    for (size_t i = 0; i < layers.size(); ++i) {
        for (uint32_t h = 0; h < layers[i].n_head_kv; ++h) {
            const int32_t l = leader[head_offset[i] + h];
            if (l < 0) {
                continue;
            }
            const std::string where = "cached layer " + std::to_string(i) + " KV head " + std::to_string(h);
            if ((size_t) l >= i || h >= layers[l].n_head_kv || leader[head_offset[l] + h] >= 0) {
                err = where + " cannot follow cached layer " + std::to_string(l) +
                    ": a leader is an earlier layer whose same KV head follows no one";
                return LLAMA_LOCALKV_ERR_ARG;
            }
            if (hparams.n_embd_head_k(layers[l].il) != hparams.n_embd_head_k(layers[i].il) ||
                layers[l].n_head/layers[l].n_head_kv != layers[i].n_head/layers[i].n_head_kv) {
                err = where + " and its leader differ in head size or GQA group";
                return LLAMA_LOCALKV_ERR_ARG;
            }
            const size_t a = head_offset[i] + h, b = head_offset[l] + h;
            if (capacities && slots &&
                    (capacities[a] != capacities[b] || GGML_PAD(slots[a], slot_pad) != GGML_PAD(slots[b], slot_pad))) {
                err = where + " must have its leader's capacity and slots (it holds the same tokens)";
                return LLAMA_LOCALKV_ERR_BUDGET;
            }
        }
    }
    return LLAMA_LOCALKV_OK;
}

int32_t llama_kv_cache_compressed::set_pod(const int32_t * leader, int32_t n, uint32_t n_sink, uint32_t n_recent, std::string & err) {
    GGML_ASSERT(!has_pending()); // the caller flushes first
    const size_t n_heads = n_heads_total();
    if (leader == nullptr || n < 0 || (size_t) n != n_heads) {
        err = "expected " + std::to_string(n_heads) + " leaders (one per KV head of every cached layer), got " + std::to_string(n);
        return LLAMA_LOCALKV_ERR_ARG;
    }
    for (const auto & layer : layers) {
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            if (layer.n_used[h] > 0 || layer.n_written[h] > 0) {
                err = "POD leaders are set on an empty cache (clear it first)";
                return LLAMA_LOCALKV_ERR_STATE;
            }
        }
    }
    std::vector<int32_t> lead(leader, leader + n);
    const bool on = std::any_of(lead.begin(), lead.end(), [](int32_t l) { return l >= 0; });
    if (on && (n_recent == 0 || (uint64_t) n_sink + n_recent > MAX_SLOTS)) {
        err = "POD needs 1 <= n_recent and n_sink + n_recent <= " + std::to_string(MAX_SLOTS);
        return LLAMA_LOCALKV_ERR_BUDGET;
    }
    if (!on) {
        lead.clear();
    }
    std::vector<uint32_t> capacities, slots;
    current_sizes(capacities, slots);
    int32_t rc = check_pod_layout(lead, capacities.data(), slots.data(), err);
    if (rc != LLAMA_LOCALKV_OK) {
        return rc;
    }

    // allocate() reads the new layout; the old one stays if the buffers cannot be had
    const auto old_leader = pod_leader;
    const uint32_t old_sink = pod_n_sink, old_recent = pod_n_recent;
    pod_leader   = lead;
    pod_n_sink   = on ? n_sink : 0;
    pod_n_recent = on ? n_recent : 0;

    storage st;
    rc = allocate(capacities.data(), slots.data(), stat_alloc, query_heads, st, err);
    if (rc != LLAMA_LOCALKV_OK) {
        pod_leader   = old_leader;
        pod_n_sink   = old_sink;
        pod_n_recent = old_recent;
        return rc;
    }
    install(st);
    return LLAMA_LOCALKV_OK;
}

// every follower holds exactly its leader's tokens, slot for slot
bool llama_kv_cache_compressed::check_pod_followers(std::string & err) const {
    for (size_t i = 0; i < layers.size(); ++i) {
        const auto & layer = layers[i];
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            if (layer.leader[h] < 0) {
                continue;
            }
            const auto & leader = layers[layer.leader[h]];
            const bool same = leader.n_used[h] == layer.n_used[h] && leader.n_written[h] == layer.n_written[h] &&
                std::equal(layer.pos.begin() + layer.base[h], layer.pos.begin() + layer.base[h] + layer.n_used[h],
                        leader.pos.begin() + leader.base[h]);
            if (!same) {
                err = "POD follower (cached layer " + std::to_string(i) + ", KV head " + std::to_string(h) +
                    ") does not hold the tokens its leader (cached layer " + std::to_string(layer.leader[h]) +
                    ") holds: keep the same slots in both";
                return false;
            }
        }
    }
    return true;
}

//
// keep
//

int32_t llama_kv_cache_compressed::check_pod_keep_proximal(int32_t i, uint32_t h, const std::vector<uint32_t> & kept,
        std::string & err) const {
    const auto & layer = layers[i];
    if (layer.leader[h] < 0 && !layer.leads[h]) {
        return LLAMA_LOCALKV_OK;
    }
    uint32_t n_sink = 0, first_recent = 0;
    pod_proximal(layer, h, n_sink, first_recent);
    const size_t n_proximal = n_sink + (layer.n_used[h] - first_recent);
    size_t found = 0;
    for (uint32_t s : kept) {
        found += s < n_sink || s >= first_recent;
    }
    if (found != n_proximal) {
        err = "KV head " + std::to_string(h) + " of cached layer " + std::to_string(i) + " is in a POD group: it must keep its " +
            std::to_string(n_proximal) + " proximal slots ([0, " + std::to_string(n_sink) + ") and [" + std::to_string(first_recent) +
            ", " + std::to_string(layer.n_used[h]) + "))";
        return LLAMA_LOCALKV_ERR_INDEX;
    }
    return LLAMA_LOCALKV_OK;
}

// (keep the leader first, with the same slots)
int32_t llama_kv_cache_compressed::check_pod_keep_followers(int32_t i, const std::vector<std::vector<uint32_t>> & kept,
        std::string & err) const {
    const auto & layer = layers[i];
    for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
        if (layer.leader[h] < 0) {
            continue;
        }
        const auto & leader = layers[layer.leader[h]];
        bool same = leader.n_used[h] == kept[h].size();
        for (size_t j = 0; same && j < kept[h].size(); ++j) {
            same = leader.pos[leader.base[h] + j] == layer.pos[layer.base[h] + kept[h][j]];
        }
        if (!same) {
            err = "KV head " + std::to_string(h) + " of cached layer " + std::to_string(i) + " follows cached layer " +
                std::to_string(layer.leader[h]) + ": it must keep the tokens its leader holds (keep the leader first, the same slots)";
            return LLAMA_LOCALKV_ERR_INDEX;
        }
    }
    return LLAMA_LOCALKV_OK;
}

//
// a follower's proximal tokens
//

void llama_kv_cache_compressed::pod_proximal(const llama_kv_compressed_layer & layer, uint32_t h, uint32_t & n_sink,
        uint32_t & first_recent) const {
    if (layer.leader[h] < 0 && !layer.leads[h]) {
        n_sink = layer.n_used[h];
        first_recent = layer.n_used[h];
        return;
    }
    // sinks and recent tokens are never evicted (keep refuses it), so they are the head's first and last slots
    const uint32_t w = layer.n_written[h];
    const uint32_t n_rec = std::min(pod_n_recent, w - std::min(pod_n_sink, w));
    n_sink = std::min({pod_n_sink, w, layer.n_used[h]});
    first_recent = std::max(n_sink, layer.n_used[h] - std::min(n_rec, layer.n_used[h]));
}

uint32_t llama_kv_cache_compressed::pod_k_row(uint32_t o) const {
    return o < pod_n_sink ? o : pod_n_sink + (o - pod_n_sink) % pod_n_recent;
}

std::vector<int32_t> llama_kv_cache_compressed::pod_row_slots(const llama_kv_compressed_layer & layer, uint32_t h) const {
    std::vector<int32_t> res(pod_n_sink + pod_n_recent, -1);
    const uint32_t w = layer.n_written[h];
    const uint32_t n_s = std::min(pod_n_sink, w);
    const uint32_t n_r = std::min(pod_n_recent, w - n_s);
    for (uint32_t o = 0; o < n_s; ++o) {
        res[o] = (int32_t) o;
    }
    for (uint32_t o = w - n_r; o < w; ++o) {
        res[pod_k_row(o)] = (int32_t) (layer.n_used[h] - (w - o));
    }
    return res;
}

// followers in the same state share one mask: their proximal tokens are the same first and last tokens written
// (never evicted), so tokens written, held and slots say it all
uint32_t llama_kv_cache_compressed::pod_state_of(llama_kv_compressed_plan & plan, int32_t i, uint32_t h) const {
    const auto & layer = layers[i];
    for (uint32_t state = 0; state < plan.pod_states.size(); ++state) {
        const auto & [rep_i, rep_h] = plan.pod_states[state];
        const auto & rep = layers[rep_i];
        if (rep.n_written[rep_h] == layer.n_written[h] && rep.n_used[rep_h] == layer.n_used[h] && rep.alloc[rep_h] == layer.alloc[h]) {
            return state;
        }
    }
    plan.pod_states.emplace_back(i, h);
    return (uint32_t) plan.pod_states.size() - 1;
}

//
// a follower's inputs and attention
//

ggml_tensor * llama_kv_cache_compressed::get_k_proximal(ggml_context * ctx, int32_t i, const llama_kv_compressed_part & part) const {
    const auto & layer = layers[i];
    GGML_ASSERT(part.n_heads == 1 && part.leader >= 0);
    const size_t row = layer.k->nb[1];
    return ggml_view_4d(ctx, layer.k, layer.k->ne[0], 1, pod_n_sink + pod_n_recent, 1, row, row, ggml_nbytes(layer.k),
            layer.k_base[part.first_head]*row);
}

void llama_kv_cache_compressed::set_input_pod_mask(ggml_tensor * dst, const llama_ubatch * ubatch, const llama_kv_compressed_plan & plan,
        uint32_t state) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer) && dst->type == GGML_TYPE_F32);
    const auto & [i, h] = plan.pod_states[state];
    const auto & layer = layers[i];
    const int64_t n_own = pod_n_sink + pod_n_recent;
    GGML_ASSERT(dst->ne[0] == n_own);
    const auto row_slot = pod_row_slots(layer, h);

    // own keys: proximal tokens the query may see (the ubatch's are causal)
    float * data = (float *) dst->data;
    for (int64_t t = 0; t < dst->ne[1]; ++t) {
        const llama_pos p_q = t < (int64_t) ubatch->n_tokens ? ubatch->pos[t] : -1;
        for (int64_t c = 0; c < n_own; ++c) {
            const int32_t s = row_slot[c];
            data[t*n_own + c] = s >= 0 && layer.pos[layer.base[h] + s] <= p_q ? 0.0f : -INFINITY;
        }
    }
}

void llama_kv_cache_compressed::set_input_pod_distant(ggml_tensor * rows, ggml_tensor * values, int32_t i) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(rows->buffer) && ggml_backend_buffer_is_host(values->buffer));
    const auto & layer = layers[i];
    int64_t * r = (int64_t *) rows->data;
    float   * v = (float *) values->data;
    int64_t n_followers = 0;
    for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
        n_followers += layer.leader[h] >= 0;
    }
    const int64_t n_tokens = ggml_nelements(rows) / std::max<int64_t>(n_followers, 1);
    // a ubatch of n tokens moves at most n slots from the recent window to the distant ones: write the n slots
    // before the first recent one (each with its value as it now stands: duplicates, clamped at 0, agree)
    int64_t k = 0;
    for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
        if (layer.leader[h] < 0) {
            continue;
        }
        uint32_t n_sink = 0, first_recent = 0;
        pod_proximal(layer, h, n_sink, first_recent);
        for (int64_t t = 0; t < n_tokens; ++t, ++k) {
            const int64_t s = std::max<int64_t>(0, (int64_t) first_recent - n_tokens + t);
            r[k] = layer.base[h] + s;
            v[k] = s >= n_sink && s < first_recent ? 0.0f : -INFINITY;
        }
    }
}

void llama_kv_cache_compressed::set_input_pod_v_rows(ggml_tensor * dst, int32_t i, uint32_t h) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer) && dst->type == GGML_TYPE_I32);
    const auto & layer = layers[i];
    const int64_t n_own = pod_n_sink + pod_n_recent;
    GGML_ASSERT(dst->ne[0] == n_own);
    const auto row_slot = pod_row_slots(layer, h);
    int32_t * data = (int32_t *) dst->data;
    for (int64_t c = 0; c < n_own; ++c) {
        data[c] = (int32_t) layer.base[h] + std::max(row_slot[c], 0); // an empty row reads any V row: its column is masked
    }
}

void llama_kv_compressed_pod_leader_kq(const llama_kv_compressed_attn & attn, ggml_tensor * q, const llama_kv_compressed_part & part) {
    ggml_context * ctx0 = attn.graph.ctx0;
    const int64_t group = q->ne[1] / part.n_heads;
    for (uint32_t j = 0; j < part.n_heads; ++j) {
        if (!attn.layer.leads[part.first_head + j]) {
            continue;
        }
        llama_kv_compressed_part head = part;
        head.first_head = part.first_head + j;
        head.n_heads    = 1;
        head.base       = part.base + j*part.alloc;
        ggml_tensor * q_h = ggml_view_3d(ctx0, q, q->ne[0], group, q->ne[2], q->nb[1], q->nb[2], j*group*q->nb[1]);
        ggml_tensor * k_h = ggml_permute(ctx0, attn.kv.get_k(ctx0, attn.i, head), 0, 2, 1, 3); // [d, n_kv, 1]
        ggml_tensor * kq  = ggml_mul_mat(ctx0, k_h, ggml_permute(ctx0, q_h, 0, 2, 1, 3));    // [n_kv, n_tokens, group]
        ggml_prec_set_acc(kq, GGML_PREC_F32);
        attn.graph.cb(kq, "pod_lead_kq", attn.il);
        attn.inp.pod_leader_kq[{attn.i, head.first_head}] = kq;
    }
}

// a follower's logits [n_own + n_kv, n_tokens, group]: its own proximal keys', then its leader's for every slot
static ggml_tensor * pod_follower_kq(const llama_kv_compressed_attn & attn, ggml_tensor * q, const llama_kv_compressed_part & part) {
    ggml_context * ctx0 = attn.graph.ctx0;
    const llama_hparams & hparams = attn.graph.hparams;

    auto it = attn.inp.pod_leader_kq.find({part.leader, part.first_head});
    GGML_ASSERT(it != attn.inp.pod_leader_kq.end() && it->second->ne[0] == (int64_t) part.n_kv && it->second->ne[1] == q->ne[2]);

    ggml_tensor * qp  = ggml_permute(ctx0, q, 0, 2, 1, 3);                                       // [d, n_tokens, group]
    ggml_tensor * kf  = ggml_permute(ctx0, attn.kv.get_k_proximal(ctx0, attn.i, part), 0, 2, 1, 3); // [d, n_own, 1]
    ggml_tensor * own = ggml_mul_mat(ctx0, kf, qp);                                               // [n_own, n_tokens, group]
    ggml_prec_set_acc(own, GGML_PREC_F32);

    ggml_tensor * kq = ggml_concat(ctx0, own, it->second, 0);
    attn.graph.cb(kq, "pod_kq", attn.il);
    if (hparams.attn_soft_cap) {
        kq = ggml_scale(ctx0, ggml_tanh(ctx0, ggml_scale(ctx0, kq, 1.0f/hparams.f_attn_logit_softcapping)), hparams.f_attn_logit_softcapping);
    }
    return kq;
}

// one softmax over [own logits of its proximal keys ; its leader's logits, proximal and empty columns masked], applied
// to [V of the proximal tokens ; V of every slot]. Not fused: flash attention takes no precomputed logits.
ggml_tensor * llama_kv_compressed_attn_pod_follower(const llama_kv_compressed_attn & attn, ggml_tensor * q, ggml_tensor * sinks,
        const llama_kv_compressed_part & part) {
    ggml_context * ctx0 = attn.graph.ctx0;

    const int64_t n_tokens = q->ne[2];
    const int64_t group    = q->ne[1];
    const int64_t n_cols   = attn.kv.pod_sink() + attn.kv.pod_recent() + part.n_kv;

    const int64_t n_own    = n_cols - part.n_kv;

    // the mask: the own proximal keys' (host, per follower state), then the leader's columns, open on the distant
    // slots (the layer's distant row, kept on the device)
    GGML_ASSERT(attn.distant != nullptr);
    ggml_tensor * kq   = pod_follower_kq(attn, q, part);
    ggml_tensor * lead = ggml_view_2d(ctx0, attn.distant, part.n_kv, 1, part.n_kv*sizeof(float), part.base*sizeof(float));
    ggml_tensor * mask = ggml_concat(ctx0, attn.inp.get_pod_mask(ctx0, part.pod_state, n_own, n_tokens),
            ggml_repeat_4d(ctx0, lead, part.n_kv, n_tokens, 1, 1), 0);

    ggml_tensor * p = ggml_soft_max_ext(ctx0, kq, mask, attn.kq_scale, attn.graph.hparams.f_max_alibi_bias);
    ggml_soft_max_add_sinks(p, sinks);

    // the values in the same order: the own proximal keys' rows (host), then every slot (a view)
    ggml_tensor * v_rows = attn.inp.get_pod_v_rows(ctx0, attn.i, part.first_head, n_own);
    ggml_tensor * v_all  = ggml_view_2d(ctx0, attn.layer.v, attn.layer.v->ne[0], part.n_kv, attn.layer.v->nb[1],
            part.base*attn.layer.v->nb[1]);
    ggml_tensor * v   = ggml_concat(ctx0, ggml_get_rows(ctx0, attn.layer.v, v_rows), ggml_cast(ctx0, v_all, GGML_TYPE_F32), 1); // [d_v, n_cols]
    ggml_tensor * vt  = ggml_cont(ctx0, ggml_transpose(ctx0, v));                             // [n_cols, d_v]
    ggml_tensor * kqv = ggml_mul_mat(ctx0, vt, p);                                            // [d_v, n_tokens, group]

    if (attn.plan.has_stats()) {
        // the logits and mask rows of the observed queries, as the attention used them
        const int64_t w = attn.plan.window;
        ggml_tensor * kq_obs = ggml_cont(ctx0, ggml_view_3d(ctx0, kq, kq->ne[0], w, group, kq->nb[1], kq->nb[2], (n_tokens - w)*kq->nb[1]));
        ggml_tensor * mask_obs = ggml_view_2d(ctx0, mask, n_cols, w, mask->nb[1], (n_tokens - w)*mask->nb[1]);
        attn.kv.build_stats(ctx0, attn.graph.gf, kq_obs, mask_obs, attn.inp.obs_scale, attn.inp.stat_ones, attn.obs_norm, attn.kq_scale,
                attn.i, part, attn.plan);
    }

    ggml_tensor * out = ggml_cont_2d(ctx0, ggml_permute(ctx0, kqv, 0, 2, 1, 3), kqv->ne[0]*group, n_tokens);
    attn.graph.cb(out, "pod_kqv", attn.il);
    return out;
}
