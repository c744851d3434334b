#pragma once

// localkv compressed KV cache, graph side: the attention input of a graph over the compressed cache and the
// attention of one layer, called from the two hooks in llama-graph.cpp (build_attn_inp_kv and build_attn).
// A layer stores its ubatch after the kept tokens of every head, then attends part by part (a run of heads with
// equal slots; a uniform layer is one part), each KV head a stream with its own mask, and computes the statistics
// switched on.

#include "llama-graph.h"
#include "llama-kv-cache-compressed.h"

#include <map>
#include <utility>
#include <vector>

// the attention input of a graph over the compressed cache: the mask template (the base's self_kq_mask),
// the write rows of every layer and AhaKV's scales. The base's mctx stays null: the memory context is mctx_compressed.
class llm_graph_input_attn_kv_compressed : public llm_graph_input_attn_kv {
public:
    llm_graph_input_attn_kv_compressed(const llama_hparams & hparams, const llama_cparams & cparams,
            const llama_kv_cache_compressed_context * mctx_compressed) :
        llm_graph_input_attn_kv(hparams, cparams, nullptr), mctx_compressed(mctx_compressed) {}

    void set_input(const llama_ubatch * ubatch) override;

    // reused only while the plan's signature is the same
    bool can_reuse(const llm_graph_params & params) override;

    // the inputs of one cached layer, filled in set_input, so a graph is reused while only the slots move
    struct layer_inputs {
        ggml_tensor * v_idxs = nullptr; // rows the ubatch is written to, I64 [n_head_kv*n_tokens]
        ggml_tensor * k_idxs = nullptr; // K's own rows in a layer with POD followers (else K is written through v_idxs)
        ggml_tensor * live   = nullptr; // the layer's live mask once the graph opened the ubatch's slots
        ggml_tensor * distant = nullptr; // POD: the layer's distant row once the graph opened the ubatch's
        ggml_tensor * distant_rows = nullptr;   // ... through these rows (I64)
        ggml_tensor * distant_values = nullptr; // ... and values (F32)
        std::map<uint32_t, ggml_tensor *> mask_offsets; // a prefill's, per part (by its first head): each head's template column
    };

    // made on first use while the graph is built (each once per graph, whatever asks for it)
    layer_inputs & get_layer_inputs(ggml_context * ctx, int32_t i, const llama_kv_compressed_layer & layer, int64_t n_rows);
    // columns [offset, offset + n_kv) of the mask template, made contiguous once per graph
    ggml_tensor * get_kq_mask_view(ggml_context * ctx, uint32_t offset, uint32_t n_kv);
    // the live-mask values of a ubatch's rows in a layer of n_head_kv KV heads (0, or -inf where hidden), F32 [1, rows]
    ggml_tensor * get_live_rows(ggml_context * ctx, uint32_t n_head_kv, int64_t n_tokens);
    // a prefill's template columns for the part of cached layer i that starts at first_head, I32 [n_heads, n_tokens]
    ggml_tensor * get_mask_offsets(ggml_context * ctx, int32_t i, uint32_t first_head, uint32_t n_heads, int64_t n_tokens);
    // POD: the mask of a follower state [n_cols, n_tokens], and the V rows of follower head h of cached layer i
    ggml_tensor * get_pod_mask(ggml_context * ctx, uint32_t state, int64_t n_cols, int64_t n_tokens);
    ggml_tensor * get_pod_v_rows(ggml_context * ctx, int32_t i, uint32_t h, int64_t n_cols);

    // AhaKV scale of each observed query row, F32 [window*n_heads_total]
    ggml_tensor * obs_scale = nullptr;
    // ones, F32 [window*n_head]: summing the observed queries' probabilities is an out_prod with them
    ggml_tensor * stat_ones = nullptr;
    // POD, while building: each leading head's logits [n_kv, n_tokens, group] by (cached layer, head), for its followers
    std::map<std::pair<int32_t, uint32_t>, ggml_tensor *> pod_leader_kq;
    // what the graph's topology depends on (llama_kv_compressed_plan::signature)
    std::vector<uint32_t> signature;

    const llama_kv_cache_compressed_context * mctx_compressed;

private:
    std::map<int32_t, layer_inputs> layers; // by cached layer
    std::map<uint32_t, ggml_tensor *> live_rows; // by the layer's KV heads
    std::map<std::pair<uint32_t, uint32_t>, ggml_tensor *> kq_mask_views; // by (column offset, n_kv)
    std::map<uint32_t, ggml_tensor *> pod_masks; // by follower state
    std::map<std::pair<int32_t, uint32_t>, ggml_tensor *> pod_v_rows; // by (cached layer, follower head)
};

// the attention input of a sliding-window model over the compressed cache: the compressed input above for its
// full-attention layers (`compressed`, a graph input of its own) and, in the base class's *_swa tensors, upstream's
// inputs for its windowed layers, filled from the windowed cache's memory context. The base class's mctx stays null.
class llm_graph_input_attn_kv_iswa_compressed : public llm_graph_input_attn_kv_iswa {
public:
    llm_graph_input_attn_kv_iswa_compressed(const llama_hparams & hparams, const llama_cparams & cparams,
            const llama_kv_cache_context * windowed, llm_graph_input_attn_kv_compressed * compressed) :
        llm_graph_input_attn_kv_iswa(hparams, cparams, nullptr), windowed(windowed), compressed(compressed) {}

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    const llama_kv_cache_context       * windowed;
    llm_graph_input_attn_kv_compressed * compressed;
};

// one layer's attention through the compressed cache while its graph is built: what every step reads
struct llama_kv_compressed_attn {
    const llm_graph_context            & graph;
    llm_graph_input_attn_kv_compressed & inp;
    const llama_kv_cache_compressed    & kv;
    const llama_kv_compressed_plan     & plan;
    const llama_kv_compressed_layer    & layer;

    int32_t i;  // cached layer
    int     il; // model layer
    float   kq_scale;
    ggml_tensor * obs_norm = nullptr; // [1, window]: the observed queries' hidden-state norms, when MAX_NORMED is on
    ggml_tensor * distant  = nullptr; // POD: the layer's distant row after this ubatch (a layer with followers)
};

// the attention input (the hook in build_attn_inp_kv)
llm_graph_input_attn_kv * llm_graph_build_attn_inp_kv_compressed(const llm_graph_context & graph);

// a sliding-window model's attention input (the hook in build_attn_inp_kv_iswa); build_attn's iswa hook sends its
// full-attention layers to the compressed input, and attends its windowed layers as upstream does
llm_graph_input_attn_kv_iswa * llm_graph_build_attn_inp_kv_iswa_compressed(const llm_graph_context & graph);

// one layer's store and attention (the hook in build_attn)
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
                int il);

// POD (llama-kv-cache-compressed-pod.cpp): a follower head's attention (q: its GQA group's queries
// [d, group, n_tokens]), and the logits of the leading heads of a part, kept for their followers
ggml_tensor * llama_kv_compressed_attn_pod_follower(const llama_kv_compressed_attn & attn, ggml_tensor * q, ggml_tensor * sinks,
        const llama_kv_compressed_part & part);
void llama_kv_compressed_pod_leader_kq(const llama_kv_compressed_attn & attn, ggml_tensor * q, const llama_kv_compressed_part & part);
