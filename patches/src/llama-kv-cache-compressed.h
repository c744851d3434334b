#pragma once

// localkv compressed KV cache: a memory module of its own (llama_memory_i), put in place of a context's
// empty plain llama_kv_cache by llama_localkv_enable (see include/llama-localkv.h). Upstream's cache is
// not touched: the graph asks this module for attention through two hooks in llama-graph.cpp
// (build_attn_inp_kv and build_attn), and the context swaps its memory through one (swap_memory).
//
// Files, by concern (the class below is defined across them):
//   llama-kv-cache-compressed.{h,cpp}      the module: llama_memory_i, memory contexts, per-ubatch plans
//   llama-kv-cache-compressed-storage.cpp  creation, the K/V and statistics buffers, resize
//   llama-kv-cache-compressed-graph.{h,cpp} the graph: its attention input, the attention of a layer part by part
//   llama-kv-cache-compressed-stats.cpp    the statistics: computed in the graph, read back
//   llama-kv-cache-compressed-compact.cpp  keep (which slots stay) and the compaction that moves their rows
//   llama-kv-cache-compressed-pod.cpp      POD: leaders and followers, a follower's attention
//
// Layout (ragged): every (layer, KV head) has its own capacity and its own number of slots. A layer owns one
// K and one V tensor of `total` rows of one head each ([n_embd_head, total], V never transposed); KV head h
// owns the contiguous rows [base[h], base[h] + alloc[h]). Its kept tokens sit in its first n_used[h] rows
// (compacted by keep) and a ubatch is appended right after them, so the attention mask of a head depends
// only on n_used[h]: one host-filled template serves every head, each viewing it at its own column offset.
//
// Attention runs once per "part": a run of consecutive KV heads with the same number of slots, read through one
// strided view in one attention call whatever each head holds (each KV head is a stream of its own to the
// attention, with its own mask: a view of the layer's `live` row at decode). A layer whose heads have equal slots
// (every uniform policy) is one part; the engine pads a ragged layer's heads into at most two runs, so a ragged
// layer costs two attention calls and a concat.
//
// keep() only decides: positions and n_used change at once, and the rows to move are recorded as a
// pending compaction. The next llama_decode (before its first ubatch is written) or any call that reads
// the device runs every pending compaction in one ggml graph (get_rows + cpy on the backend the cache lives
// in), so K and V never cross to the host (only the indices go up), and with no worst-case graph reservation
// after it (a memory update would bring one).
//
// Statistics are allocated when first asked for and computed only while switched on. They are kept
// per KV head (the GQA group's query heads summed in the graph) unless per-query-head storage is
// asked for (tests and analysis); either way they follow the rows' regions (see stat_offset).
//
// POD (llama_localkv_set_pod): a (layer, KV head) may follow the same KV head of an earlier cached layer, its
// leader. A follower keeps V for every token but K only for its proximal tokens: the first n_sink written (K rows
// [0, n_sink)) and the n_recent most recent (a ring, K rows [n_sink, n_sink + n_recent)), so its K region is
// k_alloc rows, not alloc. For the distant tokens between them it borrows the leader's logits (Q_leader K_leader^T,
// computed once in the leader's layer for all its followers): one softmax over [own proximal logits ; leader's
// logits with the proximal and empty columns masked] applied to [V of the proximal tokens ; V of every slot].
// Proximal tokens are never evicted, and a follower holds exactly its leader's tokens (keep checks both), so the
// leader's columns line up with the follower's V slots. "Proximal" is judged per ubatch: the sinks and the
// n_recent latest tokens once the ubatch is written (at decode, the paper's rule; a prefill chunk's first queries
// see fewer own recent keys, their older neighbours come from the leader).
//
// Layers are indexed one way outside this module: i, the position of a cached layer (as in the C API);
// `il` (the model's layer) is used only to look a layer up while building a graph.
//
// Sliding-window models (upstream's llama_kv_cache_iswa: Gemma 2/3, gpt-oss, Cohere2, Llama 4's chunked layers):
// only the full-attention layers are compressed; the windowed layers keep an upstream llama_kv_cache of their own
// (`windowed`, a window plus a ubatch, as upstream sizes it), which this module owns and drives beside its own
// layers: every batch is prepared, applied and removed in both, and the graph's iswa hooks attend the windowed
// layers through it exactly as upstream does (llama-kv-cache-compressed-graph.h).

#include "llama.h"
#include "llama-localkv.h"
#include "llama-batch.h"
#include "llama-kv-cache.h"
#include "llama-memory.h"

#include "ggml.h"
#include "ggml-cpp.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

struct llama_model;
struct llama_hparams;

// one cached layer of the compressed cache: its heads' regions, their tokens and its tensors
struct llama_kv_compressed_layer {
    int32_t  il     = -1; // model layer
    uint32_t n_head = 0;  // query heads
    uint32_t n_head_kv = 0;

    ggml_backend_buffer_type_t buft = nullptr; // where this layer's K, V and statistics live
    bool out_prod = false; // its device runs GGML_OP_OUT_PROD: the statistics sum over queries without a transpose
    // attention sinks or ALiBi slopes: both are indexed by query head within one stream of the attention, so this
    // layer's heads attend one at a time (a part per head)
    bool heads_alone = false;

    // per KV head
    std::vector<uint32_t> capacity;  // tokens kept by a compression (the budget)
    std::vector<uint32_t> alloc;     // slots allocated (set by the caller, padded)
    std::vector<uint32_t> n_used;    // slots in use
    std::vector<uint32_t> base;      // first row of the head's region in V and the statistics
    std::vector<uint32_t> stale_end; // slots [n_used, stale_end) still hold statistics of evicted tokens (zeroed at flush)
    uint32_t total = 0;              // rows allocated, every head

    // K rows: a head's own region [k_base[h], k_base[h] + k_alloc[h]); the same as V's but for a POD follower
    std::vector<uint32_t> k_alloc;
    std::vector<uint32_t> k_base;
    uint32_t k_total = 0;

    // POD: the cached layer this head follows (-1: none), whether later layers follow it, and the tokens
    // written since the cache was cleared (a follower's ring is indexed by it)
    std::vector<int32_t>  leader;
    std::vector<uint8_t>  leads;
    std::vector<uint32_t> n_written;

    std::vector<llama_pos> pos; // [total], pos[base[h] + s]; -1 for a free slot

    // pending compaction: head h moves its old slots pending[h][j] to slot j (ascending); empty when none
    std::vector<std::vector<uint32_t>> pending;

    ggml_tensor * k = nullptr; // [n_embd_head_k, k_total]
    ggml_tensor * v = nullptr; // [n_embd_head_v, total]
    // F16 [1, total]: 0 on a slot the next queries may see (in use, position not hidden), -inf elsewhere. Written
    // whole by the host when the layout changes (keep, resize, hide, clear), and per ubatch by the graph, which
    // opens the ubatch's own slots; a decode step's mask for a part is a plain view of it
    ggml_tensor * live = nullptr;
    // POD only, F32 [1, total]: 0 on a follower's distant slots (where its leader's logits open), -inf elsewhere.
    // Written whole by the host with the live mask; each ubatch's graph opens the slots that left the recent
    // window with one set_rows, so a follower's mask needs no per-token host work beyond its own proximal keys
    ggml_tensor * distant = nullptr;

    // int32 aliases of the K and V bytes ([head row bytes / 4, total]): get_rows moves them bit for bit
    // whatever the cache type; null when a head's row is not a multiple of 4 bytes (host fallback)
    ggml_tensor * k_raw = nullptr;
    ggml_tensor * v_raw = nullptr;

    // float32 statistics, null until asked for. Per KV head: [total], slot s of head h at base[h] + s.
    // Per query head (r = group rows per KV head): [total*r], query head h*r + g at base[h]*r + g*alloc[h] + s.
    // VNORM is always per KV head, [1, total] (a row per slot, written with set_rows like K and V).
    ggml_tensor * stats[LLAMA_LOCALKV_STAT_COUNT] = {};

    // whether some head of this layer follows another layer (its K rows then differ from its V rows)
    bool has_followers() const { return std::any_of(leader.begin(), leader.end(), [](int32_t l) { return l >= 0; }); }

    // slots in use, every head
    uint32_t used_total() const;

    // rows statistic `stat` keeps per KV head: one, or its GQA group's query heads when stored per query head
    // (a statistic of the written token, VNORM or SCORE, is a property of the KV head's row)
    uint32_t stat_rows(int32_t stat, bool query_heads) const;
    // statistics set once per token when it is written (a row per slot, [1, total], through set_rows like K and V),
    // not accumulated from attention
    static bool written_with_token(int32_t stat) {
        return stat == LLAMA_LOCALKV_STAT_VNORM || stat == LLAMA_LOCALKV_STAT_SCORE;
    }

    // float offset of slot 0 of row g (of `rows`) of KV head h in a statistic (the layout above)
    size_t stat_offset(uint32_t rows, uint32_t h, uint32_t g) const {
        return (size_t) base[h]*rows + (size_t) g*alloc[h];
    }
};

// consecutive KV heads [first_head, first_head + n_heads) of a layer that attend as one: the same slots, so one
// strided view covers them (rows of head first_head + j start at base + j*alloc); each head has its own fill
struct llama_kv_compressed_part {
    uint32_t first_head  = 0;
    uint32_t n_heads     = 0;
    uint32_t base        = 0;  // first row of the first head
    uint32_t alloc       = 0;  // slots of each head (the view's head stride)
    uint32_t n_kv        = 0;  // slots attended: all of them (so a part's rows of the live mask are one contiguous block)
    int32_t  leader      = -1; // POD: the leader's cached layer when this part is one follower head
    uint32_t pod_state   = 0;  // POD: followers in the same state share one mask (index into plan.pod_states)
};

// where one ubatch goes, decided before it is written (or the worst case, for graph reservation)
struct llama_kv_compressed_plan {
    std::vector<std::vector<llama_kv_compressed_part>> parts; // per cached layer
    std::vector<uint32_t> head_offset; // per cached layer: index of its first KV head over all layers
    std::vector<uint32_t> ubatch_slot; // per KV head over all layers: slot of the ubatch's first token (its fill before it)
    std::vector<float>    obs_scale;   // [n_heads_total][window]: AhaKV scale of each observed query row
    uint32_t window = 0;         // observed queries (min(obs_window, n_tokens)), 0 when no statistic is on
    uint32_t flags  = 0;         // statistics computed for this ubatch
    uint32_t ubatch_column = 0;  // column of the ubatch's first token in the mask template (the largest ubatch_slot)
    uint32_t width  = 0;         // columns of the mask template
    uint32_t epoch  = 0;         // the storage's epoch when planned
    bool     hide   = false;     // positions are hidden (a prefill's masks then add the live mask)
    std::vector<std::pair<int32_t, uint32_t>> pod_states; // POD: a (cached layer, head) of every follower state

    // whether statistics are computed for this ubatch
    bool has_stats() const { return flags != 0 && window != 0; }

    // the slot of the ubatch's first token in KV head h of cached layer i
    uint32_t slot_of(size_t i, uint32_t h) const { return ubatch_slot[head_offset[i] + h]; }
    // the column of the mask template where KV head h of cached layer i views it (its causal block lines up with
    // everyone's): a prefill's masks are these views, gathered per part
    uint32_t mask_offset(size_t i, uint32_t h) const { return ubatch_column - slot_of(i, h); }

    // what a graph built for this plan depends on: per part its heads and width, and the statistics (a prefill's
    // also the template's width). Between two reallocations of the storage a decode graph stays the same, across
    // compressions too: what each head holds is in the live mask, not in the graph
    std::vector<uint32_t> signature(uint32_t n_tokens) const;
};

class llama_kv_cache_compressed : public llama_memory_i {
public:
    // slots are allocated in multiples of ALLOC_PAD (keeps rows of every quantized type block-aligned), or of
    // DEVICE_PAD when a layer lives on a device (a part attends all its slots, and a GPU's fast attention kernels
    // want a multiple of 256, as upstream pads its own cache); LLAMA_LOCALKV_SLOT_PAD overrides both (measurement)
    static constexpr uint32_t ALLOC_PAD  = 32;
    static constexpr uint32_t DEVICE_PAD = 256;
    // refuse absurd budgets before asking a backend for the memory
    static constexpr uint64_t MAX_SLOTS = 1u << 24;

    // the statistics computed from one softmax at the model's scale, from one at AhaKV's scales, and those that sum
    // the observed queries' probabilities (with a column of ones, llm_graph_input_attn_kv_compressed::stat_ones)
    static constexpr uint32_t STATS_PLAIN = (1u << LLAMA_LOCALKV_STAT_OBS) | (1u << LLAMA_LOCALKV_STAT_ACC) |
        (1u << LLAMA_LOCALKV_STAT_LAST) | (1u << LLAMA_LOCALKV_STAT_MAX) | (1u << LLAMA_LOCALKV_STAT_MAX_NORMED);
    // the statistics that read each token's hidden state at the attention's input
    static constexpr uint32_t STATS_HIDDEN = (1u << LLAMA_LOCALKV_STAT_MAX_NORMED) | (1u << LLAMA_LOCALKV_STAT_SCORE);
    static constexpr uint32_t STATS_ADAPTIVE = (1u << LLAMA_LOCALKV_STAT_OBS_ADAPTIVE) | (1u << LLAMA_LOCALKV_STAT_ACC_ADAPTIVE);
    static constexpr uint32_t STATS_SUMMED = STATS_ADAPTIVE | (1u << LLAMA_LOCALKV_STAT_OBS) | (1u << LLAMA_LOCALKV_STAT_ACC) |
        (1u << LLAMA_LOCALKV_STAT_LAST);

    // a compressed cache in place of `tmpl`, a context's empty plain cache: the same cached layers, cache
    // types, buffer types (devices) and K/V rotations, with per-(layer, KV head) capacities and slot counts
    // (n of each, layer-major). nullptr with `code` (a llama_localkv_status) and `err` set when it cannot be made.
    static std::unique_ptr<llama_kv_cache_compressed> create(const llama_model & model, const llama_kv_cache & tmpl,
            const uint32_t * capacities, const uint32_t * slots, int32_t n, int32_t & code, std::string & err);

    ~llama_kv_cache_compressed() override = default;

    //
    // llama_memory_i: one sequence whose positions never move
    //

    llama_memory_context_ptr init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) override;
    llama_memory_context_ptr init_full() override;
    // the windowed layers' update only (NO_UPDATE otherwise): compactions run when a batch is applied, so the
    // context does not reserve its worst-case graph again after each
    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;

    bool get_can_shift() const override { return false; }

    void clear(bool data) override;

    bool seq_rm  (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id)                                                          override;
    void seq_add (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, int d) override;

    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;

    // the K and V buffers (statistics are reported apart: stats_bytes)
    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;

    // not supported: throw
    [[noreturn]] void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    [[noreturn]] void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    //
    // between decodes (the C API); each returns a llama_localkv_status and sets `err` on failure.
    // Everything that reads or reshapes the device needs the pending compactions flushed first.
    //

    // new capacities and slot counts, keeping the tokens in use (reallocates the buffers)
    int32_t resize(const uint32_t * capacities, const uint32_t * slots, int32_t n, std::string & err);

    // statistics computed from now on (allocated when first asked for)
    int32_t set_stats(uint32_t flags, uint32_t window, bool query_heads, std::string & err);
    int32_t clear_stat(int32_t stat, std::string & err);

    // hide positions [p0, p1) from the next ubatches' queries (p0 >= p1: none)
    void set_hidden(llama_pos p0, llama_pos p1);

    // a replay (KVzip) starts or ends: a sliding-window model's windowed cache is set aside when it starts and
    // given back as it was when it ends, so the replay's tokens never push the real recent tokens out of the
    // window (the caller synchronizes first). Nothing to do for a model without windowed layers.
    void set_replay(bool on);

    // a learned scorer for cached layer i (see llama_localkv_set_scorer; w1 null removes it)
    int32_t set_scorer(int32_t i, int32_t n_in, int32_t n_hidden, const float * w1, const float * b1, const float * w2,
            const float * b2, std::string & err);
    // POD: leader[k] per (layer, KV head) (-1 or an earlier cached layer whose same head leads), the sinks and
    // the recent ring of the followers; only on an empty cache (reallocates the buffers). All -1: POD off.
    int32_t set_pod(const int32_t * leader, int32_t n, uint32_t n_sink, uint32_t n_recent, std::string & err);
    uint32_t pod_sink()   const { return pod_n_sink; }
    uint32_t pod_recent() const { return pod_n_recent; }
    // a head's proximal slots: [0, n_sink) and [first_recent, n_used) (every slot of a head in no POD group)
    void pod_proximal(const llama_kv_compressed_layer & layer, uint32_t h, uint32_t & n_sink, uint32_t & first_recent) const;

    // n_keep[h] slots of each KV head h of cached layer i, listed head after head in `slots`
    int32_t keep(int32_t i, const int32_t * slots, const int32_t * n_keep, std::string & err);

    // statistic `stat` of cached layer i, slots in use head after head; returns the floats written (one transfer)
    int32_t get_stat(int32_t i, int32_t stat, bool sum_per_kv_head, float * out, size_t n_out, std::string & err);
    // the same for every cached layer, layer after layer (one transfer per device)
    int64_t get_stats(int32_t stat, bool sum_per_kv_head, float * out, size_t n_out, std::string & err);

    // raw K (which = 0) or V (1) rows of the slots in use, head after head; returns the bytes of one row
    int32_t read_rows(int32_t i, int32_t which, void * out, size_t n_out, std::string & err);

    // the context whose memory this cache is (called once, when it is enabled): compactions run on its scheduler
    void attach(llama_context * lctx);
    // run the pending compactions (and clear freed slots' statistics) on the cache's backends; true if any ran
    bool flush();
    bool has_pending() const;

    // a sliding-window model's windowed layers, kept as upstream keeps them (taken over once, at creation)
    void set_windowed(std::unique_ptr<llama_kv_cache> cache) { windowed = std::move(cache); }
    llama_kv_cache * get_windowed() const { return windowed.get(); }

    const std::vector<llama_kv_compressed_layer> & get_layers() const { return layers; }
    uint32_t n_heads_total() const;
    uint64_t get_transfer_bytes() const { return transfer_bytes; }
    uint64_t get_transfers()      const { return transfers; }
    size_t   stats_bytes() const; // the statistics and the live masks: what the cache holds beside K and V

    //
    // one ubatch (llama_kv_cache_compressed_context): planned from the state before it, then written
    // (llama-kv-cache-compressed.cpp)
    //

    // where a ubatch of n_tokens goes; changes nothing
    llama_kv_compressed_plan plan_ubatch(uint32_t n_tokens) const;
    // the largest graph every head can produce, for graph reservation
    llama_kv_compressed_plan plan_reserve() const;
    // append the ubatch's positions after the kept tokens of every head (its K and V are written by the graph)
    void write_ubatch(const llama_ubatch & ubatch);

    //
    // graph pieces (llama-kv-cache-compressed-graph.cpp; statistics: -stats.cpp; POD: -pod.cpp)
    //

    // cached layer of model layer il (it must be one)
    int32_t layer_index(int32_t il) const;

    // K or V of one part of cached layer i: [n_embd_head, part.n_heads, part.n_kv], heads part.alloc rows apart
    ggml_tensor * get_k(ggml_context * ctx, int32_t i, const llama_kv_compressed_part & part) const;
    ggml_tensor * get_v(ggml_context * ctx, int32_t i, const llama_kv_compressed_part & part) const;
    // POD follower part: K of its proximal region [n_embd_head_k, 1, n_sink + n_recent]
    ggml_tensor * get_k_proximal(ggml_context * ctx, int32_t i, const llama_kv_compressed_part & part) const;

    // writes of a ubatch go through `idxs` (I64 rows [n_head_kv*n_tokens], set by set_input_idxs), so a
    // graph is reused as slots move (K rows go through their own in a layer with POD followers)
    ggml_tensor * cpy_k(ggml_context * ctx, ggml_tensor * k_cur, ggml_tensor * k_idxs, int32_t i) const;
    ggml_tensor * cpy_v(ggml_context * ctx, ggml_tensor * v_cur, ggml_tensor * v_idxs, int32_t i) const;
    void store_vnorm(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * v_cur, ggml_tensor * v_idxs, int32_t i,
            const llama_kv_compressed_plan & plan) const;
    // the scorer's prediction for the ubatch's tokens from their attention input x [n_embd, n_tokens], into SCORE
    void store_score(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * x, ggml_tensor * v_idxs, int32_t i,
            const llama_kv_compressed_plan & plan) const;
    // the graph of model layer il had no attention input to read (STATS_HIDDEN cannot be computed for this model)
    void set_hidden_input_missing(int32_t il) const { hidden_input_missing = il; }

    // statistics nodes for one part of cached layer i, expanded into gf, from the logits of its observed queries
    // kq_obs [n_cols, window, n_head of the part] and their mask rows [n_cols, window]: the part's slots are the
    // last part.n_kv columns (a POD follower's logits start with its own proximal keys)
    // obs_norm [1, window]: the observed queries' hidden-state norms ||x_j|| (for MAX_NORMED; null without it)
    void build_stats(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * kq_obs, ggml_tensor * mask_obs,
            ggml_tensor * obs_scale, ggml_tensor * ones, ggml_tensor * obs_norm, float kq_scale, int32_t i,
            const llama_kv_compressed_part & part, const llama_kv_compressed_plan & plan) const;

    // the Hadamard rotations upstream's cache applies to K and V for this cache type (null when none)
    ggml_tensor * build_input_rot(ggml_context * ctx, bool v) const;
    void          set_input_rot(ggml_tensor * dst, bool v) const;

    void set_input_kq_mask  (ggml_tensor * dst, const llama_ubatch * ubatch, const llama_kv_compressed_plan & plan) const;
    // the live-mask values of the ubatch's rows (F32, a row per (token, KV head) as the write rows): 0, or -inf for a
    // token whose position is hidden
    void set_input_live_rows(ggml_tensor * dst, const llama_ubatch * ubatch) const;
    // the template columns each KV head of a part views (I32 [n_heads, n_tokens]; a prefill's masks gather them)
    void set_input_mask_offsets(ggml_tensor * dst, int32_t i, uint32_t first_head, const llama_kv_compressed_plan & plan) const;
    // the live mask of the part's heads [n_kv, 1, 1, n_heads] (a stream per KV head), from `live` (the layer's row
    // after the graph opened the ubatch's slots)
    ggml_tensor * get_live(ggml_context * ctx, ggml_tensor * live, const llama_kv_compressed_part & part) const;
    // K or V of a part as streams, for upstream's attention: [n_embd_head, 1, n_kv, n_heads]
    ggml_tensor * get_k_streams(ggml_context * ctx, int32_t i, const llama_kv_compressed_part & part) const;
    ggml_tensor * get_v_streams(ggml_context * ctx, int32_t i, const llama_kv_compressed_part & part) const;
    // write every layer's live mask from what its heads hold, when it changed (before a ubatch is written)
    void upload_live();
    uint32_t get_slot_pad() const { return slot_pad; }
    void set_input_obs_scale(ggml_tensor * dst, const llama_kv_compressed_plan & plan) const;
    void set_input_idxs     (ggml_tensor * dst, int32_t i, const llama_kv_compressed_plan & plan, bool k_rows) const;
    // POD: a follower state's mask of its own proximal keys [n_sink + n_recent, n_tokens] (the leader's columns come
    // from the distant row), a follower's V rows of those keys (I32 [n_sink + n_recent]), and the distant rows a
    // ubatch opens in cached layer i (every follower head's, n_tokens each: rows I64 [n], values F32 [1, n])
    void set_input_pod_mask  (ggml_tensor * dst, const llama_ubatch * ubatch, const llama_kv_compressed_plan & plan, uint32_t state) const;
    void set_input_pod_v_rows(ggml_tensor * dst, int32_t i, uint32_t h) const;
    void set_input_pod_distant(ggml_tensor * rows, ggml_tensor * values, int32_t i) const;

private:
    explicit llama_kv_cache_compressed(const llama_model & model);

    const llama_model   & model;
    const llama_hparams & hparams;

    std::vector<llama_kv_compressed_layer> layers; // the cached layers, in the order of upstream's cache
    std::unique_ptr<llama_kv_cache> windowed;      // a sliding-window model's windowed layers (else null)
    std::unordered_map<int32_t, int32_t> map_layer_ids; // model layer -> cached layer

    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> kv_bufs;
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> live_bufs; // the live masks (2 bytes per slot)
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> stat_bufs;
    ggml_context_ptr raw_ctx; // holds the k_raw / v_raw aliases

    // learned scorers per cached layer (KVzap), on the layer's device; they outlive reallocations of the storage
    struct scorer {
        ggml_tensor * w1 = nullptr; // [n_in, n_hidden or n_head_kv]
        ggml_tensor * b1 = nullptr;
        ggml_tensor * w2 = nullptr; // [n_hidden, n_head_kv] (null: linear)
        ggml_tensor * b2 = nullptr;
        ggml_context_ptr        ctx;
        ggml_backend_buffer_ptr buf;
    };
    std::vector<scorer> scorers;
    mutable int32_t hidden_input_missing = -1; // a model layer whose graph had no attention input to read

    uint32_t stat_flags  = 0;     // statistics computed by the next ubatches
    uint32_t stat_alloc  = 0;     // statistics allocated (every one ever asked for)
    uint32_t obs_window  = 32;
    bool     query_heads = false; // statistics per query head instead of summed per KV head

    // bytes moved between host and backend by compression (indices, statistics read, live masks, host fallbacks),
    // and the synchronous transfers that moved them (each a ggml_backend_tensor_get/set/memset)
    uint64_t transfer_bytes = 0;
    uint64_t transfers      = 0;

    // changes whenever a tensor a graph may point to is replaced (resize, statistics allocated or freed):
    // a graph built before is never reused after
    uint32_t epoch = 0;

    uint32_t slot_pad  = ALLOC_PAD; // slots per head are a multiple of this (set at creation from the layers' devices)

    // the context whose memory this is (attach): compactions run on its scheduler
    llama_context * owner = nullptr;
    bool     live_dirty = true;     // the live masks no longer match what the heads hold: uploaded before the next ubatch

    llama_pos pos_max = -1; // last position written (the sequence goes on from here)

    llama_pos hide_p0 = 0; // positions [hide_p0, hide_p1) are hidden from the queries
    llama_pos hide_p1 = 0;
    bool in_replay = false;
    std::vector<uint8_t> windowed_saved; // the windowed cache as it was when the replay started (upstream's format)

    // POD: a follower keeps K for its first pod_n_sink tokens and a ring of the pod_n_recent latest
    uint32_t pod_n_sink   = 0;
    uint32_t pod_n_recent = 0;
    std::vector<int32_t> pod_leader; // per head over all layers (empty: POD off); survives reallocation
    bool pod_dirty = false; // a keep since the last batch: check that followers still hold their leaders' tokens

    // host copies of upstream's Hadamard rotations for K and V ([n, n] each; empty when off)
    std::vector<float> rot[2];

    //
    // storage (llama-kv-cache-compressed-storage.cpp)
    //

    // K/V buffers and layer tensors built aside and swapped in only once they all exist
    struct storage {
        std::vector<llama_kv_compressed_layer> layers;
        std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> kv_bufs;
        std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> live_bufs;
        std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> stat_bufs;
        ggml_context_ptr raw_ctx;
    };
    int32_t allocate(const uint32_t * capacities, const uint32_t * slots, uint32_t stat_mask, bool per_query_head,
            storage & out, std::string & err) const;
    // a layer like `old` with new regions per head (no tokens, no tensors); `k` indexes the heads over all layers
    llama_kv_compressed_layer layout_layer(const llama_kv_compressed_layer & old, const uint32_t * capacities,
            const uint32_t * slots, size_t k) const;
    void    install(storage & st);
    // the tokens in use of `old` (K/V rows, statistics, positions) copied into `layer` of new storage
    void    carry_over(const llama_kv_compressed_layer & old, llama_kv_compressed_layer & layer) const;

    int32_t check_sizes(const uint32_t * capacities, const uint32_t * slots, int32_t n, std::string & err) const;
    // the capacities and slots allocated now, per head over all layers
    void    current_sizes(std::vector<uint32_t> & capacities, std::vector<uint32_t> & slots) const;

    //
    // planning a ubatch (llama-kv-cache-compressed.cpp)
    //

    llama_kv_compressed_plan make_plan(uint32_t n_tokens, bool reserve) const;
    void plan_parts(llama_kv_compressed_plan & plan, bool reserve) const;
    void plan_mask_template(llama_kv_compressed_plan & plan) const;
    void plan_obs_scale(llama_kv_compressed_plan & plan, uint32_t n_tokens) const;

    //
    // keep and compaction (llama-kv-cache-compressed-compact.cpp)
    //

    // the slots each head keeps (n_keep[h] of `slots` for head h), checked and in ascending order
    int32_t kept_slots(int32_t i, const int32_t * slots, const int32_t * n_keep, std::vector<std::vector<uint32_t>> & kept,
            std::string & err) const;
    void record_keep(size_t i, const std::vector<std::vector<uint32_t>> & kept);
    // whether statistic `stat` can be read (as rows per KV head when sum_per_kv_head)
    int32_t check_stat(int32_t stat, bool sum_per_kv_head, std::string & err) const;
    void compact_on_host(ggml_tensor * t, const llama_kv_compressed_layer & layer);

    //
    // POD (llama-kv-cache-compressed-pod.cpp)
    //

    // a POD layout (leader per head over all layers) for these capacities and slots (either may be NULL: not checked)
    int32_t check_pod_layout(const std::vector<int32_t> & leader, const uint32_t * capacities, const uint32_t * slots, std::string & err) const;
    // every follower holds exactly its leader's tokens (checked before a batch after a keep)
    bool    check_pod_followers(std::string & err) const;
    // a keep of head h of cached layer i in a POD group keeps its proximal slots (a follower has no other copy of
    // their keys); a keep of cached layer i keeps in each follower the tokens its leader holds
    int32_t check_pod_keep_proximal(int32_t i, uint32_t h, const std::vector<uint32_t> & kept, std::string & err) const;
    int32_t check_pod_keep_followers(int32_t i, const std::vector<std::vector<uint32_t>> & kept, std::string & err) const;
    // the follower state of head h of cached layer i: an index into plan.pod_states (added when new)
    uint32_t pod_state_of(llama_kv_compressed_plan & plan, int32_t i, uint32_t h) const;
    // the K row of a follower's token written as the o-th: a sink row, else its place in the recent ring
    uint32_t pod_k_row(uint32_t o) const;
    // for every own K row of a follower: the slot of the token it holds, or -1 (not written, or no longer recent)
    std::vector<int32_t> pod_row_slots(const llama_kv_compressed_layer & layer, uint32_t h) const;
};

// a no_alloc ggml context for n_tensors tensor headers
ggml_context * llama_kv_compressed_meta_ctx(size_t n_tensors);

// a new value for every storage change of any compressed cache (see llama_kv_cache_compressed::epoch)
uint32_t llama_kv_compressed_next_epoch();

// graph nodes a compressed cache may add to a decode graph beyond upstream's budget (0 for any other memory):
// one attention per KV head, each with its mask and statistics
uint32_t llama_kv_compressed_extra_nodes(const llama_memory_i * mem);

// the memory context of one batch, of the worst case (graph reservation) or of an update (the windowed layers')
class llama_kv_cache_compressed_context : public llama_memory_context_i {
public:
    explicit llama_kv_cache_compressed_context(llama_memory_status status);

    // the worst case
    explicit llama_kv_cache_compressed_context(llama_kv_cache_compressed * kv);

    // an update: the windowed layers' (the compressed layers' compactions run when the next batch is applied)
    llama_kv_cache_compressed_context(llama_kv_cache_compressed * kv, llama_context * lctx);

    // a batch (`windowed`: the windowed layers' context for the same ubatches, null without them)
    llama_kv_cache_compressed_context(llama_kv_cache_compressed * kv, std::vector<llama_ubatch> ubatches,
            llama_memory_context_ptr windowed = nullptr);

    bool next()  override;
    bool apply() override;

    llama_memory_status  get_status() const override { return status; }
    const llama_ubatch & get_ubatch() const override;

    llama_kv_cache_compressed      * get_cache() const { return kv; }
    const llama_kv_compressed_plan & get_plan()  const { return plan; }
    // the windowed layers' memory context (null for a model without them)
    const llama_kv_cache_context   * get_windowed() const;

private:
    llama_memory_status status;

    llama_kv_cache_compressed * kv   = nullptr;
    llama_context             * lctx = nullptr;

    std::vector<llama_ubatch> ubatches;
    size_t i_cur = 0;

    llama_kv_compressed_plan plan; // of the current ubatch (or the worst case)

    llama_memory_context_ptr windowed; // the windowed layers' context, stepped with this one
};
