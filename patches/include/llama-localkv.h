// llama-localkv.h: the localkv extension API for llama.cpp (compressed KV cache).
//
// One flat C header, following llama.h's habits: every function is prefixed
// `llama_localkv_`, takes the object it acts on first, never throws or aborts,
// and reports errors as return values documented above each declaration.
#ifndef LLAMA_LOCALKV_H
#define LLAMA_LOCALKV_H

#include "llama.h"

#include <stddef.h>
#include <stdint.h>

// Bumped whenever a declaration in this header changes meaning or signature.
// localkv's Python bindings refuse to run against a library with another value.
#define LLAMA_LOCALKV_ABI_VERSION 11

#ifdef __cplusplus
extern "C" {
#endif

    // The ABI version the library was built with (LLAMA_LOCALKV_ABI_VERSION).
    // A stock llama.cpp does not export this symbol at all, which is how
    // callers tell a localkv-patched build from an unpatched one.
    LLAMA_API int32_t llama_localkv_abi_version(void);

    //
    // Memory introspection: what llama.cpp really allocated for the KV cache
    //

    // Total bytes of the buffers held by the context's memory module (its KV
    // cache), summed over all backends, as llama.cpp's own memory breakdown
    // reports them. Returns -1 if ctx is NULL.
    LLAMA_API int64_t llama_localkv_memory_bytes(const struct llama_context * ctx);

    // Bytes of the compute (scratch) buffers the context's scheduler holds,
    // summed over all backends. Returns -1 if ctx is NULL.
    LLAMA_API int64_t llama_localkv_compute_bytes(const struct llama_context * ctx);

    // Number of model layers, counted over every KV cache of the context's
    // memory (a sliding-window model has two caches), that store K/V.
    // Returns -1 if ctx is NULL or its memory is not a KV cache (recurrent).
    LLAMA_API int32_t llama_localkv_n_kv_layers(const struct llama_context * ctx);

    // For the i-th KV layer (0 <= i < llama_localkv_n_kv_layers), the model
    // layer index, its KV heads and the bytes of the K and V tensors llama.cpp
    // allocated for it. Any output pointer may be NULL. Returns 0 on success,
    // -1 for a NULL ctx or a memory that is not a KV cache, -2 if i is out of
    // range.
    LLAMA_API int32_t llama_localkv_kv_layer_info(
            const struct llama_context * ctx,
                               int32_t   i,
                               int32_t * il,
                               int32_t * n_head_kv,
                                size_t * k_bytes,
                                size_t * v_bytes);

    // A sliding-window model's windowed layers (Gemma 2/3, gpt-oss, ...): those
    // its compressed cache keeps as upstream keeps them, a window of cells each
    // (with compression off: upstream's SWA cache). 0 for a model without them,
    // -1 for a NULL ctx.
    LLAMA_API int32_t llama_localkv_n_windowed_layers(const struct llama_context * ctx);

    // For the i-th windowed layer: the model layer, the cells of its window and
    // the bytes of its K and V tensors. Any output pointer may be NULL. Returns
    // 0, -1 for a NULL ctx, -2 if i is out of range.
    LLAMA_API int32_t llama_localkv_windowed_layer_info(
            const struct llama_context * ctx,
                               int32_t   i,
                               int32_t * il,
                              uint32_t * n_cells,
                                size_t * k_bytes,
                                size_t * v_bytes);


    //
    // Compressed KV cache
    //
    // A memory module of its own (llama_memory_i) that replaces a context's
    // empty plain KV cache, chosen per context by llama_localkv_enable. Every
    // (layer, KV head) has its own capacity, its own number of slots and its
    // own set of tokens. The
    // memory llama.cpp allocates is the sum over (layer, KV head) of
    // slots x head dim x (K bytes + V bytes), with the slots chosen by the
    // caller (padded to a multiple of 32): they may be fewer than the capacity
    // while the cache fills, and grow or shrink with resize.
    //
    // A sliding-window model (upstream's two caches: Gemma 2/3, gpt-oss,
    // Cohere2) has only its full-attention layers compressed, and those are its
    // cached layers below; its windowed layers keep a window-sized upstream
    // cache inside the compressed module (llama_localkv_windowed_layer_info).
    //
    // Per-head arrays (capacities, slots, counts) list every KV head of cached
    // layer 0, then of layer 1, and so on (llama_localkv_kv_layer_info gives
    // each layer's KV heads); per-layer outputs (positions, statistics, rows)
    // list head 0's slots in use, then head 1's, and so on.
    //
    // Kept tokens keep their original positions (their keys were rotated once,
    // when they were written); nothing is ever shifted. A new ubatch is written
    // after the kept tokens of every head, so decoding fails with "no KV slot"
    // (llama_decode returns 1) once a head has no room left: the caller reads
    // the statistics and calls llama_localkv_keep to make room, then goes on.
    //
    // llama_localkv_keep moves K and V rows on the backend they live in (one
    // ggml graph of get_rows and cpy for every layer kept since the last
    // decode, run by the next llama_decode or any call below that reads the
    // device): only indices, and the statistics a caller reads, cross between
    // host and backend (llama_localkv_transfer_bytes counts them).
    //
    // Restrictions: one sequence (n_seq_max = 1), a causal decoder-only model
    // whose memory is a plain KV cache (no sliding-window, MLA, recurrent or
    // hybrid memory), layer split (not LLAMA_SPLIT_MODE_TENSOR), and no state
    // save/load while enabled.

    // error codes returned by the functions below (0 means success)
    enum llama_localkv_status {
        LLAMA_LOCALKV_OK              =  0,
        LLAMA_LOCALKV_ERR_ARG         = -1, // NULL pointer, bad size or count
        LLAMA_LOCALKV_ERR_UNSUPPORTED = -2, // this context's memory cannot be compressed
        LLAMA_LOCALKV_ERR_STATE       = -3, // not enabled, or enabled on a non-empty cache
        LLAMA_LOCALKV_ERR_LAYER       = -4, // no such cached layer
        LLAMA_LOCALKV_ERR_INDEX       = -5, // slot out of range or repeated within a head
        LLAMA_LOCALKV_ERR_BUDGET      = -6, // capacity or headroom out of range
        LLAMA_LOCALKV_ERR_ALLOC       = -7, // the backend could not allocate the buffers
    };

    // statistics computed inside the compute graph of every llama_decode for
    // which they are switched on (llama_localkv_set_stats); all are float32,
    // indexed by slot, and read back with llama_localkv_get_stat
    enum llama_localkv_stat {
        // softmax attention of the last W queries of the ubatch against every
        // kept token, summed over those queries (SnapKV's observation window);
        // per query head, overwritten by each ubatch
        LLAMA_LOCALKV_STAT_OBS          = 0,
        // the same with AhaKV's adaptive scale per query row:
        // sqrt(2 ln(i/k) / d) where i > k, 1/sqrt(d) otherwise, with i the
        // number of tokens the query sees and k the layer's capacity
        LLAMA_LOCALKV_STAT_OBS_ADAPTIVE = 1,
        // running sum of STAT_OBS over every ubatch since the token arrived
        // (H2O's accumulated attention); per query head
        LLAMA_LOCALKV_STAT_ACC          = 2,
        // the attention row of the ubatch's last query; per query head
        LLAMA_LOCALKV_STAT_LAST         = 3,
        // squared L2 norm of each kept value vector; per KV head, always on
        LLAMA_LOCALKV_STAT_VNORM        = 4,
        // running sum of STAT_OBS_ADAPTIVE (AhaKV's recent accumulation while
        // decoding); per query head
        LLAMA_LOCALKV_STAT_ACC_ADAPTIVE = 5,
        // running maximum of the attention a token received from the last W
        // queries of every ubatch since it was cleared, over those queries and
        // over the query heads of its GQA group (KVzip's reconstruction score
        // when the queries replay the context); per query head
        LLAMA_LOCALKV_STAT_MAX          = 6,
        // STAT_MAX with each observed query's probabilities divided by the norm
        // of its hidden state at the attention's input, ||x_j||: KVzip+'s score
        // (KVzap, arXiv 2601.07891) before its per-query-head factor ||W_o v||,
        // which the caller applies; per query head
        LLAMA_LOCALKV_STAT_MAX_NORMED   = 7,
        // the learned scorer's prediction (llama_localkv_set_scorer) for each
        // token, computed from its hidden state at the attention's input when
        // the token is written; per KV head. Layers without a scorer hold 0
        LLAMA_LOCALKV_STAT_SCORE        = 8,
        LLAMA_LOCALKV_STAT_COUNT        = 9,
    };

    // set_stats flag: keep the statistics per query head (as attention computed
    // them) instead of summed over each GQA group per KV head (the default)
    #define LLAMA_LOCALKV_STATS_QUERY_HEADS (1u << 31)

    // Last error message of this thread (a static string, never NULL).
    LLAMA_API const char * llama_localkv_last_error(void);

    // Replace the context's (empty) plain KV cache by a compressed cache with
    // the same layers, cache types and devices; llama_get_memory(ctx) returns
    // the new module from then on (a pointer taken before is dangling).
    // capacities[k] is the number of tokens the k-th (layer, KV head) keeps
    // (the per-head order above); slots[k] the slots allocated for it now
    // (>= 1; a batch that does not fit fails with "no KV slot"); n_heads the
    // number of KV heads over all cached layers. The plain cache is freed.
    // Returns 0, or ERR_ARG / ERR_UNSUPPORTED / ERR_STATE / ERR_BUDGET / ERR_ALLOC
    // (the context is unchanged on error).
    LLAMA_API int32_t llama_localkv_enable(
            struct llama_context * ctx,
                  const uint32_t * capacities,
                  const uint32_t * slots,
                         int32_t   n_heads);

    // Change the capacities and slot counts of compressed storage (per head,
    // as enable), keeping the tokens each head holds: the buffers are
    // reallocated and the kept rows copied over, backend to backend. Fails
    // with ERR_STATE, changing nothing, if a head holds more tokens than its
    // new slots (keep fewer first). Used to grow for a prompt's working set
    // and shrink back to the budget.
    LLAMA_API int32_t llama_localkv_resize(
            struct llama_context * ctx,
                  const uint32_t * capacities,
                  const uint32_t * slots,
                         int32_t   n_heads);

    // Whether compressed storage is on: 1 yes, 0 no, ERR_ARG for a NULL ctx.
    LLAMA_API int32_t llama_localkv_enabled(const struct llama_context * ctx);

    // Choose the statistics computed by the next llama_decode calls: flags is
    // a bit mask of (1 << LLAMA_LOCALKV_STAT_*), optionally with
    // LLAMA_LOCALKV_STATS_QUERY_HEADS; window the number of last queries of
    // each ubatch observed (W >= 1, 32 by default). A statistic is allocated
    // (zeroed) the first time it is asked for and kept, not computed, while
    // it is off; switching QUERY_HEADS frees and zeroes them all.
    LLAMA_API int32_t llama_localkv_set_stats(
            struct llama_context * ctx,
                        uint32_t   flags,
                        uint32_t   window);

    // Zero statistic `stat` in every slot of every layer (for example to
    // restart H2O's accumulation after a compression). A slot freed by a
    // compression is zeroed in every statistic, so a token written there later
    // starts from zero.
    LLAMA_API int32_t llama_localkv_clear_stat(struct llama_context * ctx, int32_t stat);

    // Hide the tokens at positions [p0, p1) from the queries of the next
    // llama_decode calls, in their attention and in the statistics, until
    // called again (p0 >= p1 hides nothing). KVzip's replay of a span uses it
    // so that its queries see only the sinks, the span and themselves. While
    // tokens are hidden every KV head attends on its own (one call per head).
    LLAMA_API int32_t llama_localkv_set_hidden(struct llama_context * ctx, int32_t p0, int32_t p1);

    // A replay starts (on != 0) or ends (on = 0). A sliding-window model's
    // windowed layers are set aside when it starts and given back as they were
    // when it ends, so what is decoded in between never reaches their window
    // (the caller then removes the replay's positions with seq_rm). Nothing
    // changes for a model without windowed layers. Returns 0 or an error.
    LLAMA_API int32_t llama_localkv_set_replay(struct llama_context * ctx, int32_t on);

    // A learned scorer for the i-th cached layer (KVzap's surrogate): from the
    // hidden state x [n_in] of a token at the attention's input (after the
    // layer's norm), one score per KV head, computed inside the graph when the
    // token is written while STAT_SCORE is on. n_hidden = 0: linear,
    // s = w1 x + b1 with w1 [n_head_kv][n_in] row-major and b1 [n_head_kv];
    // n_hidden > 0: s = w2 gelu(w1 x + b1) + b2 with w1 [n_hidden][n_in],
    // b1 [n_hidden], w2 [n_head_kv][n_hidden], b2 [n_head_kv]. n_in must be the
    // model's embedding width. w1 NULL removes the layer's scorer. The weights
    // are copied to the layer's device. Returns 0, ERR_LAYER, ERR_ARG (bad
    // size, NULL weight) or ERR_ALLOC. The attention input is found in the
    // graph as the input of the K projection; a model where it cannot be found
    // makes llama_localkv_get_stat of STAT_SCORE and STAT_MAX_NORMED fail with
    // ERR_UNSUPPORTED after the decode that looked for it.
    LLAMA_API int32_t llama_localkv_set_scorer(
            struct llama_context * ctx,
                         int32_t   i,
                         int32_t   n_in,
                         int32_t   n_hidden,
                     const float * w1,
                     const float * b1,
                     const float * w2,
                     const float * b2);

    // POD (cross-layer attention sharing for distant tokens). leader[k], in the
    // per-head order, is -1 or the (earlier) cached layer whose same KV head the
    // k-th (layer, KV head) follows; a leader follows no one, and a follower has
    // its leader's capacity and slots. A follower stores V for every token but K
    // only for its proximal tokens: the first n_sink written and a ring of the
    // n_recent latest (its K buffer is n_sink + n_recent slots, padded, whatever
    // its slots). For the distant tokens in between it uses its leader's logits
    // for the same queries: one softmax over [own proximal logits ; leader's
    // distant logits] applied to [V proximal ; V distant]. Followers attend
    // without flash attention (ggml ops); leaders and every other head as before.
    // A ubatch may not be longer than n_recent. Proximal tokens cannot be
    // evicted, and keep on a follower must leave it its leader's tokens (keep
    // the leader first, with the same slots); only removing the whole sequence
    // is allowed, and hidden positions are not. Only on an empty cache (the
    // buffers are reallocated); all -1 turns POD off. Returns 0, or ERR_ARG
    // (bad leader), ERR_BUDGET, ERR_STATE (cache not empty), ERR_ALLOC.
    LLAMA_API int32_t llama_localkv_set_pod(
            struct llama_context * ctx,
                   const int32_t * leader,
                         int32_t   n_heads,
                        uint32_t   n_sink,
                        uint32_t   n_recent);

    // Per (layer, KV head), in the per-head order: its POD leader (-1: none),
    // the K slots allocated for it, and its proximal slots [0, n_sink) and
    // [first_recent, n_used) (for a head in no POD group, all it holds). Any
    // output may be NULL, else holds n entries. Returns the number of KV heads.
    LLAMA_API int32_t llama_localkv_pod_state(
            const struct llama_context * ctx,
                               int32_t * leader,
                              uint32_t * k_slots,
                              uint32_t * n_sink,
                              uint32_t * first_recent,
                                size_t   n);

    // Occupancy of every (layer, KV head), in the per-head order: capacity,
    // allocated slots and slots in use. Each output may be NULL, else holds at
    // least n entries. Returns the number of KV heads (call with NULL outputs
    // and n = 0 to ask for it), or an error code.
    LLAMA_API int32_t llama_localkv_cache_state(
            const struct llama_context * ctx,
                              uint32_t * capacity,
                              uint32_t * n_alloc,
                              uint32_t * n_used,
                                size_t   n);

    // Positions of the tokens in the i-th layer's slots in use, head after
    // head (head h's n_used[h] positions follow head h-1's). n_out must be at
    // least the layer's slots in use. Returns that count, or an error code.
    LLAMA_API int32_t llama_localkv_get_positions(
            const struct llama_context * ctx,
                               int32_t   i,
                               int32_t * out,
                                size_t   n_out);

    // Copy statistic `stat` of the i-th layer for the slots in use, head after
    // head: KV heads when sum_per_kv_head is true (or the statistic is VNORM),
    // else query heads (each with its KV head's slots), which needs statistics
    // kept per query head (LLAMA_LOCALKV_STATS_QUERY_HEADS; ERR_STATE
    // otherwise). n_out must be large enough. Returns the floats written, or
    // an error code (ERR_STATE for a statistic never switched on).
    LLAMA_API int32_t llama_localkv_get_stat(
            struct llama_context * ctx,
                         int32_t   i,
                         int32_t   stat,
                            bool   sum_per_kv_head,
                           float * out,
                          size_t   n_out);

    // llama_localkv_get_stat for every cached layer, layer after layer, in one
    // call: one transfer per device (each device's layers are one block).
    // Returns the floats written, or an error code.
    LLAMA_API int64_t llama_localkv_get_stats(
            struct llama_context * ctx,
                         int32_t   stat,
                            bool   sum_per_kv_head,
                           float * out,
                          size_t   n_out);

    // Keep, in each KV head h of the i-th layer, n_keep[h] of its tokens: the
    // slots listed head after head in `slots` (head h's n_keep[h] entries
    // follow head h-1's; distinct, each < that head's slots in use), and free
    // every other slot of that layer; statistics follow their tokens. Heads
    // may keep different counts. K and V rows move bit for bit (no
    // requantization) on the backend, at the next decode or read. Returns 0
    // or an error code; on error nothing changes.
    LLAMA_API int32_t llama_localkv_keep(
            struct llama_context * ctx,
                         int32_t   i,
                   const int32_t * slots,
                   const int32_t * n_keep);

    // Bytes of the statistics buffers and the per-slot attention masks (not part of the KV buffers).
    LLAMA_API int64_t llama_localkv_stats_bytes(const struct llama_context * ctx);

    // Bytes moved between host and backend by compression since enable:
    // indices uploaded by keep, statistics read, the per-slot masks written
    // after a keep, and row copies of the host fallback (a cache type whose
    // per-head rows are not whole 4-byte words).
    LLAMA_API int64_t llama_localkv_transfer_bytes(const struct llama_context * ctx);

    // The synchronous transfers (reads, writes, clears) that moved them.
    LLAMA_API int64_t llama_localkv_transfers(const struct llama_context * ctx);

    // The raw bytes of the K (which = 0) or V (1) rows of the i-th layer's
    // slots in use, as stored: one row per (KV head, slot), head after head.
    // Returns the bytes of one row (out NULL and n_out 0 only ask for it), or
    // an error code. For tests.
    LLAMA_API int32_t llama_localkv_read_rows(
            struct llama_context * ctx,
                         int32_t   i,
                         int32_t   which,
                            void * out,
                          size_t   n_out);

#ifdef __cplusplus
}
#endif

#endif // LLAMA_LOCALKV_H
