// localkv compressed KV cache, the memory module: llama_memory_i, the memory contexts, per-ubatch plans (where
// a ubatch goes, then writing it) and reading K/V rows back. The layout is described in llama-kv-cache-compressed.h.

#include "llama-kv-cache-compressed.h"

#include "llama-context.h"

#include "llama-batch.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

ggml_context * llama_kv_compressed_meta_ctx(size_t n_tensors) {
    ggml_init_params params = {
        /*.mem_size   =*/ n_tensors*ggml_tensor_overhead(),
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ true,
    };
    return ggml_init(params);
}

uint32_t llama_kv_compressed_layer::used_total() const {
    uint32_t n = 0;
    for (uint32_t u : n_used) {
        n += u;
    }
    return n;
}

uint32_t llama_kv_compressed_layer::stat_rows(int32_t stat, bool query_heads) const {
    return written_with_token(stat) || !query_heads ? 1 : n_head / n_head_kv;
}

std::vector<uint32_t> llama_kv_compressed_plan::signature(uint32_t n_tokens) const {
    // a decode step's masks are views of the live masks; a prefill's gather from a template of this width
    std::vector<uint32_t> sig = { epoch, n_tokens, n_tokens > 1 ? width : 0u, window, flags, n_tokens > 1 && hide ? 1u : 0u };
    for (const auto & layer_parts : parts) {
        sig.push_back((uint32_t) layer_parts.size());
        for (const auto & part : layer_parts) {
            sig.push_back(part.first_head);
            sig.push_back(part.n_heads);
            sig.push_back(part.n_kv);
            sig.push_back((uint32_t) (part.leader + 1));
            sig.push_back(part.pod_state);
        }
        // a prefill's masks: each head's column in the template (which heads share a view)
        for (size_t h = 0; n_tokens > 1 && h < layer_parts.size(); ++h) {
            const auto & part = layer_parts[h];
            for (uint32_t j = 0; j < part.n_heads; ++j) {
                sig.push_back(mask_offset(&layer_parts - parts.data(), part.first_head + j));
            }
        }
    }
    return sig;
}

uint32_t llama_kv_compressed_extra_nodes(const llama_memory_i * mem) {
    const auto * kv = dynamic_cast<const llama_kv_cache_compressed *>(mem);
    return kv ? 128*kv->n_heads_total() + 256 : 0; // per part (at most a head): attention, statistics, a max tree
}

int32_t llama_kv_cache_compressed::layer_index(int32_t il) const {
    return map_layer_ids.at(il);
}

uint32_t llama_kv_cache_compressed::n_heads_total() const {
    uint32_t n = 0;
    for (const auto & layer : layers) {
        n += layer.n_head_kv;
    }
    return n;
}

size_t llama_kv_cache_compressed::stats_bytes() const {
    size_t total = 0;
    for (const auto * bufs : { &stat_bufs, &live_bufs }) {
        for (const auto & [c, buf] : *bufs) {
            total += ggml_backend_buffer_get_size(buf.get());
        }
    }
    return total;
}

//
// llama_memory_i
//

llama_memory_context_ptr llama_kv_cache_compressed::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
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
        return std::make_unique<llama_kv_cache_compressed_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }

    if (pod_dirty) {
        std::string err;
        if (!check_pod_followers(err)) {
            LLAMA_LOG_ERROR("%s: %s\n", __func__, err.c_str());
            return std::make_unique<llama_kv_cache_compressed_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
        }
        pod_dirty = false;
    }
    // a follower's ring must hold a whole ubatch
    if (!pod_leader.empty()) {
        for (const auto & ub : ubatches) {
            if (ub.n_tokens > pod_n_recent) {
                LLAMA_LOG_ERROR("%s: a ubatch of %u tokens is longer than the POD recent window (%u): use smaller ubatches\n",
                        __func__, ub.n_tokens, pod_n_recent);
                return std::make_unique<llama_kv_cache_compressed_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
        }
    }

    // tokens are only appended while a batch runs, so every head must hold the whole batch
    for (const auto & layer : layers) {
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            if (layer.n_used[h] + n_total > layer.alloc[h]) {
                LLAMA_LOG_DEBUG("%s: layer %d KV head %u has %u free slots, the batch needs %u: compress first\n", __func__,
                        layer.il, h, layer.alloc[h] - layer.n_used[h], n_total);
                return std::make_unique<llama_kv_cache_compressed_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
        }
    }

    // the windowed layers find their cells as upstream's cache does (a ring over the window)
    llama_memory_context_ptr windowed_ctx;
    if (windowed) {
        auto sinfos = windowed->prepare(ubatches);
        if (sinfos.empty()) {
            return std::make_unique<llama_kv_cache_compressed_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
        }
        windowed_ctx = std::make_unique<llama_kv_cache_context>(windowed.get(), std::move(sinfos), ubatches);
    }

    return std::make_unique<llama_kv_cache_compressed_context>(this, std::move(ubatches), std::move(windowed_ctx));
}

llama_memory_context_ptr llama_kv_cache_compressed::init_full() {
    return std::make_unique<llama_kv_cache_compressed_context>(this);
}

llama_memory_context_ptr llama_kv_cache_compressed::init_update(llama_context * lctx, bool optimize) {
    GGML_UNUSED(optimize);
    return std::make_unique<llama_kv_cache_compressed_context>(this, lctx);
}

void llama_kv_cache_compressed::clear(bool data) {
    for (auto & layer : layers) {
        std::fill(layer.n_used.begin(), layer.n_used.end(), 0);
        std::fill(layer.stale_end.begin(), layer.stale_end.end(), 0); // the statistics buffers are cleared below
        std::fill(layer.n_written.begin(), layer.n_written.end(), 0);
        layer.pending.clear();
        std::fill(layer.pos.begin(), layer.pos.end(), -1);
    }
    pos_max = -1;
    live_dirty = true;

    for (auto & [c, buf] : stat_bufs) {
        ggml_backend_buffer_clear(buf.get(), 0);
    }
    if (data) {
        for (auto & [c, buf] : kv_bufs) {
            ggml_backend_buffer_clear(buf.get(), 0);
        }
    }
    if (windowed) {
        windowed->clear(data);
    }
}

bool llama_kv_cache_compressed::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
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
    if (windowed && !windowed->seq_rm(seq_id, p0, p1)) {
        return false;
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
        const auto & layer = layers[i];
        std::vector<std::vector<uint32_t>> kept(layer.n_head_kv);
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            for (uint32_t s = 0; s < layer.n_used[h]; ++s) {
                const llama_pos p = layer.pos[layer.base[h] + s];
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
void llama_kv_cache_compressed::seq_cp(llama_seq_id, llama_seq_id, llama_pos, llama_pos) {
    LLAMA_LOG_WARN("%s: not supported by the compressed KV cache, ignored\n", __func__);
}

void llama_kv_cache_compressed::seq_keep(llama_seq_id) {
    LLAMA_LOG_WARN("%s: not supported by the compressed KV cache, ignored\n", __func__);
}

void llama_kv_cache_compressed::seq_add(llama_seq_id, llama_pos, llama_pos, llama_pos) {
    LLAMA_LOG_WARN("%s: not supported by the compressed KV cache, ignored\n", __func__);
}

void llama_kv_cache_compressed::seq_div(llama_seq_id, llama_pos, llama_pos, int) {
    LLAMA_LOG_WARN("%s: not supported by the compressed KV cache, ignored\n", __func__);
}

llama_pos llama_kv_cache_compressed::seq_pos_min(llama_seq_id seq_id) const {
    if (seq_id != 0) {
        return -1;
    }
    llama_pos res = -1;
    for (const auto & layer : layers) {
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            for (uint32_t s = 0; s < layer.n_used[h]; ++s) {
                const llama_pos p = layer.pos[layer.base[h] + s];
                res = res < 0 ? p : std::min(res, p);
            }
        }
    }
    return res;
}

llama_pos llama_kv_cache_compressed::seq_pos_max(llama_seq_id seq_id) const {
    return seq_id == 0 ? pos_max : -1;
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_cache_compressed::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> res;
    for (const auto & [c, buf] : kv_bufs) {
        res[ggml_backend_buffer_get_type(buf.get())] += ggml_backend_buffer_get_size(buf.get());
    }
    if (windowed) {
        for (const auto & [buft, size] : windowed->memory_breakdown()) {
            res[buft] += size;
        }
    }
    return res;
}

void llama_kv_cache_compressed::state_write(llama_io_write_i &, llama_seq_id, llama_state_seq_flags) const {
    throw std::runtime_error("the compressed KV cache cannot be saved");
}

void llama_kv_cache_compressed::state_read(llama_io_read_i &, llama_seq_id, llama_state_seq_flags) {
    throw std::runtime_error("the compressed KV cache cannot be loaded");
}

//
// memory contexts
//

llama_kv_cache_compressed_context::llama_kv_cache_compressed_context(llama_memory_status status) : status(status) {}

llama_kv_cache_compressed_context::llama_kv_cache_compressed_context(llama_kv_cache_compressed * kv) :
    status(LLAMA_MEMORY_STATUS_SUCCESS), kv(kv), plan(kv->plan_reserve()),
    windowed(kv->get_windowed() ? kv->get_windowed()->init_full() : nullptr) {
    if (windowed) {
        status = llama_memory_status_combine(status, windowed->get_status());
    }
}

llama_kv_cache_compressed_context::llama_kv_cache_compressed_context(llama_kv_cache_compressed * kv, llama_context * lctx) :
    status(LLAMA_MEMORY_STATUS_NO_UPDATE), kv(kv), lctx(lctx),
    windowed(kv->get_windowed() ? kv->get_windowed()->init_update(lctx, false) : nullptr) {
    if (windowed) {
        status = llama_memory_status_combine(status, windowed->get_status());
    }
}

llama_kv_cache_compressed_context::llama_kv_cache_compressed_context(llama_kv_cache_compressed * kv, std::vector<llama_ubatch> ubatches,
        llama_memory_context_ptr windowed) :
    status(LLAMA_MEMORY_STATUS_SUCCESS), kv(kv), ubatches(std::move(ubatches)), windowed(std::move(windowed)) {}

const llama_kv_cache_context * llama_kv_cache_compressed_context::get_windowed() const {
    return static_cast<const llama_kv_cache_context *>(windowed.get());
}

bool llama_kv_cache_compressed_context::next() {
    GGML_ASSERT(status == LLAMA_MEMORY_STATUS_SUCCESS);
    if (windowed) {
        windowed->next();
    }
    return ++i_cur < ubatches.size();
}

bool llama_kv_cache_compressed_context::apply() {
    GGML_ASSERT(!llama_memory_status_is_fail(status));

    if (windowed && windowed->get_status() == LLAMA_MEMORY_STATUS_SUCCESS && !windowed->apply()) {
        return false;
    }
    if (lctx) {
        return true; // an update: the windowed layers' only
    }
    if (ubatches.empty()) {
        return true; // the worst case: nothing to record
    }
    const llama_ubatch & ubatch = ubatches[i_cur];
    plan = kv->plan_ubatch(ubatch.n_tokens);
    kv->flush();       // the pending compactions (not as a memory update: no worst-case reservation follows)
    kv->upload_live(); // what the heads hold before the ubatch (the graph opens the ubatch's own slots)
    kv->write_ubatch(ubatch);
    return true;
}

const llama_ubatch & llama_kv_cache_compressed_context::get_ubatch() const {
    GGML_ASSERT(status == LLAMA_MEMORY_STATUS_SUCCESS && i_cur < ubatches.size());
    return ubatches[i_cur];
}

//
// per-ubatch plans
//

llama_kv_compressed_plan llama_kv_cache_compressed::plan_ubatch(uint32_t n_tokens) const {
    return make_plan(n_tokens, false);
}

llama_kv_compressed_plan llama_kv_cache_compressed::plan_reserve() const {
    return make_plan(1, true);
}

llama_kv_compressed_plan llama_kv_cache_compressed::make_plan(uint32_t n_tokens, bool reserve) const {
    llama_kv_compressed_plan plan;
    plan.flags = stat_flags;
    plan.epoch = epoch;
    plan.hide  = hide_p0 < hide_p1;

    plan_parts(plan, reserve);
    plan_mask_template(plan);
    if (plan.flags != 0) {
        plan.window = std::min(obs_window, n_tokens);
        plan_obs_scale(plan, n_tokens);
    }
    return plan;
}

// KV head h of `layer` as a part of its own: it attends all its slots (the live mask hides the empty ones)
static llama_kv_compressed_part head_part(const llama_kv_compressed_layer & layer, uint32_t h) {
    llama_kv_compressed_part part;
    part.first_head  = h;
    part.n_heads     = 1;
    part.base        = layer.base[h];
    part.alloc       = layer.alloc[h];
    part.n_kv        = layer.alloc[h];
    part.leader      = layer.leader[h];
    return part;
}

// whether `part` (one head of `layer`) joins the last of `parts`: a head with as many slots as the previous ones,
// right after them, neither of them a POD follower (a follower attends on its own)
static bool join_part(const llama_kv_compressed_layer & layer, std::vector<llama_kv_compressed_part> & parts,
        const llama_kv_compressed_part & part) {
    if (parts.empty() || part.leader >= 0 || layer.heads_alone) {
        return false;
    }
    auto & last = parts.back();
    if (last.leader < 0 && last.alloc == part.alloc && last.base + last.n_heads*last.alloc == part.base) {
        last.n_heads++;
        return true;
    }
    return false;
}

void llama_kv_cache_compressed::plan_parts(llama_kv_compressed_plan & plan, bool reserve) const {
    plan.parts.resize(layers.size());
    plan.head_offset.resize(layers.size());
    plan.ubatch_slot.assign(n_heads_total(), 0);

    uint32_t head_offset = 0;
    for (size_t i = 0; i < layers.size(); ++i) {
        const auto & layer = layers[i];
        plan.head_offset[i] = head_offset;
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            plan.ubatch_slot[head_offset + h] = reserve ? 0 : layer.n_used[h];
            llama_kv_compressed_part part = head_part(layer, h);
            if (part.leader >= 0) {
                part.pod_state = pod_state_of(plan, (int32_t) i, h);
            }
            if (!join_part(layer, plan.parts[i], part)) {
                plan.parts[i].push_back(part);
            }
        }
        head_offset += layer.n_head_kv;
    }
}

// the ubatch's column in the mask template is the largest ubatch slot, so every head's view of the template
// starts at a column >= 0; the template is as wide as the widest view
void llama_kv_cache_compressed::plan_mask_template(llama_kv_compressed_plan & plan) const {
    plan.ubatch_column = 0;
    for (uint32_t slot : plan.ubatch_slot) {
        plan.ubatch_column = std::max(plan.ubatch_column, slot);
    }
    plan.width = 1;
    for (size_t i = 0; i < layers.size(); ++i) {
        for (uint32_t h = 0; h < layers[i].n_head_kv; ++h) {
            plan.width = std::max(plan.width, plan.mask_offset(i, h) + layers[i].alloc[h]);
        }
    }
}

// AhaKV's scale of every observed query row of every KV head: sqrt(2 ln(n/k) / d) where the query sees n > k
// tokens (k the head's capacity), 1/sqrt(d) otherwise
void llama_kv_cache_compressed::plan_obs_scale(llama_kv_compressed_plan & plan, uint32_t n_tokens) const {
    plan.obs_scale.resize((size_t) n_heads_total()*plan.window);
    for (size_t i = 0; i < layers.size(); ++i) {
        const float d = (float) hparams.n_embd_head_k(layers[i].il);
        for (const auto & part : plan.parts[i]) {
            for (uint32_t h = part.first_head; h < part.first_head + part.n_heads; ++h) {
                for (uint32_t r = 0; r < plan.window; ++r) {
                    // tokens visible to the observed query r: the kept ones plus the ubatch up to and including it
                    const double n_vis = (double) plan.slot_of(i, h) + (n_tokens - plan.window + r) + 1;
                    const double k     = (double) layers[i].capacity[h];
                    plan.obs_scale[(size_t) (plan.head_offset[i] + h)*plan.window + r] =
                        n_vis > k ? (float) std::sqrt(2.0*std::log(n_vis/k)/d) : 1.0f/std::sqrt(d);
                }
            }
        }
    }
}

void llama_kv_cache_compressed::write_ubatch(const llama_ubatch & ubatch) {
    const uint32_t n_tokens = ubatch.n_tokens;
    for (auto & layer : layers) {
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            GGML_ASSERT(layer.n_used[h] + n_tokens <= layer.alloc[h]); // checked in init_batch
            for (uint32_t j = 0; j < n_tokens; ++j) {
                layer.pos[layer.base[h] + layer.n_used[h] + j] = ubatch.pos[j];
            }
            layer.n_used[h]    += n_tokens;
            layer.n_written[h] += n_tokens;
        }
    }
    for (uint32_t j = 0; j < n_tokens; ++j) {
        pos_max = std::max(pos_max, ubatch.pos[j]);
    }
}

// the windowed cache's state (upstream's own serialization) written to and read from host memory
namespace {
struct windowed_state_writer : llama_io_write_i {
    std::vector<uint8_t> & buf;
    explicit windowed_state_writer(std::vector<uint8_t> & buf) : buf(buf) {}
    void write(const void * src, size_t size) override {
        buf.insert(buf.end(), (const uint8_t *) src, (const uint8_t *) src + size);
    }
    void write_tensor(ggml_tensor * tensor, size_t offset, size_t size) override {
        const size_t at = buf.size();
        buf.resize(at + size);
        ggml_backend_tensor_get(tensor, buf.data() + at, offset, size);
    }
    size_t n_bytes() override { return buf.size(); }
};

struct windowed_state_reader : llama_io_read_i {
    const std::vector<uint8_t> & buf;
    size_t at = 0;
    explicit windowed_state_reader(const std::vector<uint8_t> & buf) : buf(buf) {}
    void read(void * dst, size_t size) override {
        GGML_ASSERT(at + size <= buf.size());
        memcpy(dst, buf.data() + at, size);
        at += size;
    }
    void read_tensor(ggml_tensor * tensor, size_t offset, size_t size) override {
        GGML_ASSERT(at + size <= buf.size());
        ggml_backend_tensor_set(tensor, buf.data() + at, offset, size);
        at += size;
    }
    size_t n_bytes() override { return at; }
};
} // namespace

void llama_kv_cache_compressed::set_hidden(llama_pos p0, llama_pos p1) {
    hide_p0 = p0;
    hide_p1 = p1;
    live_dirty = true;
}

// one host copy of each device block that `rows` of every layer view (filled by `fill(layer, row)`, `closed` where
// it writes nothing), then one transfer per block
template <typename T, typename Fill>
static void upload_rows(const std::vector<llama_kv_compressed_layer> & layers, ggml_tensor * llama_kv_compressed_layer::* rows,
        T closed, Fill && fill, uint64_t & transfers, uint64_t & transfer_bytes) {
    std::map<ggml_tensor *, std::vector<T>> blocks;
    for (const auto & layer : layers) {
        const ggml_tensor * t = layer.*rows;
        if (!t) {
            continue;
        }
        auto & host = blocks[t->view_src];
        host.resize(ggml_nelements(t->view_src), closed);
        fill(layer, host.data() + t->view_offs/sizeof(T));
    }
    for (const auto & [block, host] : blocks) {
        ggml_backend_tensor_set(block, host.data(), 0, ggml_nbytes(block));
        transfers++;
        transfer_bytes += ggml_nbytes(block);
    }
}

void llama_kv_cache_compressed::upload_live() {
    if (!live_dirty) {
        return;
    }
    if (owner) {
        owner->synchronize(); // the last graph may still read the masks
    }
    const ggml_fp16_t open   = ggml_fp32_to_fp16(0.0f);
    const ggml_fp16_t closed = ggml_fp32_to_fp16(-INFINITY);
    upload_rows(layers, &llama_kv_compressed_layer::live, closed, [&](const llama_kv_compressed_layer & layer, ggml_fp16_t * row) {
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            for (uint32_t s = 0; s < layer.n_used[h]; ++s) {
                const llama_pos p = layer.pos[layer.base[h] + s];
                row[layer.base[h] + s] = p >= hide_p0 && p < hide_p1 ? closed : open;
            }
        }
    }, transfers, transfer_bytes);
    // POD: each follower's distant slots, as its proximal ones stand now (the graph opens the ones a ubatch adds)
    upload_rows(layers, &llama_kv_compressed_layer::distant, -INFINITY, [&](const llama_kv_compressed_layer & layer, float * row) {
        for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
            uint32_t n_sink = 0, first_recent = 0;
            pod_proximal(layer, h, n_sink, first_recent);
            for (uint32_t s = n_sink; layer.leader[h] >= 0 && s < first_recent; ++s) {
                row[layer.base[h] + s] = 0.0f;
            }
        }
    }, transfers, transfer_bytes);
    live_dirty = false;
}

void llama_kv_cache_compressed::set_replay(bool on) {
    if (!windowed || on == in_replay) {
        return;
    }
    if (on) {
        windowed_saved.clear();
        windowed_state_writer io(windowed_saved);
        windowed->state_write(io);
    } else {
        windowed_state_reader io(windowed_saved);
        windowed->state_read(io); // clears the cache first: the replay's cells go with it
        windowed_saved.clear();
        windowed_saved.shrink_to_fit();
    }
    in_replay = on;
}

//
// reading K and V rows back (the C API)
//

int32_t llama_kv_cache_compressed::read_rows(int32_t i, int32_t which, void * out, size_t n_out, std::string & err) {
    if (i < 0 || i >= (int32_t) layers.size()) {
        err = "no cached layer " + std::to_string(i);
        return LLAMA_LOCALKV_ERR_LAYER;
    }
    if (which != 0 && which != 1) {
        err = "which must be 0 (K) or 1 (V)";
        return LLAMA_LOCALKV_ERR_ARG;
    }
    GGML_ASSERT(!has_pending()); // the caller flushes first
    const auto & layer = layers[i];
    ggml_tensor * t = which == 0 ? layer.k : layer.v;
    const size_t row = t->nb[1];
    const size_t n = (size_t) layer.used_total()*row;
    if (out == nullptr && n_out == 0) {
        return (int32_t) row; // a size query
    }
    if (out == nullptr || n_out < n) {
        err = "output buffer too small: need " + std::to_string(n) + " bytes";
        return LLAMA_LOCALKV_ERR_ARG;
    }
    uint8_t * dst = (uint8_t *) out;
    for (uint32_t h = 0; h < layer.n_head_kv; ++h) {
        if (which == 0 && layer.leader[h] >= 0) {
            // a POD follower: the K rows of its proximal slots, zeros for the distant ones (it has no keys for them)
            std::memset(dst, 0, (size_t) layer.n_used[h]*row);
            const auto row_slot = pod_row_slots(layer, h);
            for (size_t r = 0; r < row_slot.size(); ++r) {
                if (row_slot[r] >= 0) {
                    ggml_backend_tensor_get(t, dst + (size_t) row_slot[r]*row, (layer.k_base[h] + r)*row, row);
                }
            }
        } else if (layer.n_used[h] > 0) {
            ggml_backend_tensor_get(t, dst, (which == 0 ? layer.k_base[h] : layer.base[h])*row, layer.n_used[h]*row);
        }
        dst += layer.n_used[h]*row;
    }
    return (int32_t) row;
}
