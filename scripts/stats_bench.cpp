// The observation statistic of one layer against that layer's flash attention, in ggml alone (CPU).
// Sizes of the default model at the 8K bench: a 256-token chunk over 4352 keys, 14 query heads in
// 2 KV heads, head size 64, the last 32 queries observed.
//
//   g++ -O2 -std=c++17 scripts/stats_bench.cpp -I TREE/ggml/include -L TREE/build/bin \
//       -lggml -lggml-base -lggml-cpu -Wl,-rpath,TREE/build/bin -o /tmp/stats_bench
//   /tmp/stats_bench [N_KV=4352] [THREADS=2]
//
// (TREE: a built git tree of the patched llama.cpp, `python -m localkv.build tree TREE`.)
#include "ggml.h"
#include "ggml-cpu.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

static void fill_random(ggml_tensor * t) {
    for (int64_t i = 0; i < ggml_nelements(t); ++i) {
        const float x = rand() / (float) RAND_MAX - 0.5f;
        if (t->type == GGML_TYPE_F32) {
            ((float *) t->data)[i] = x;
        } else {
            ((ggml_fp16_t *) t->data)[i] = ggml_fp32_to_fp16(x);
        }
    }
}

enum variant { FLASH_ATTN, SUM_TRANSPOSED, SUM_OUT_PROD };

static double run(int64_t n_kv, int n_threads, variant which) {
    const int64_t T = 256, w = 32, d = 64, n_head = 14, n_head_kv = 2, group = n_head / n_head_kv;
    ggml_init_params ip = { (size_t) 1 << 30, nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * k = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, d, n_head_kv, n_kv);
    ggml_tensor * v = ggml_new_tensor_3d(ctx, GGML_TYPE_F16, d, n_head_kv, n_kv);
    ggml_tensor * q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, n_head, T);
    ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, T);
    ggml_tensor * stat = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, n_head_kv);
    fill_random(k);
    fill_random(v);
    fill_random(q);
    memset(mask->data, 0, ggml_nbytes(mask));
    const float scale = 0.125f;

    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_tensor * kp = ggml_permute(ctx, k, 0, 2, 1, 3); // [d, n_kv, n_head_kv]
    if (which == FLASH_ATTN) {
        ggml_tensor * out = ggml_flash_attn_ext(ctx, ggml_permute(ctx, q, 0, 2, 1, 3), kp,
                                                ggml_permute(ctx, v, 0, 2, 1, 3), mask, scale, 0.0f, 0.0f);
        ggml_build_forward_expand(gf, out);
    } else {
        // as the patched cache builds it: the last w queries' probabilities over every key
        ggml_tensor * q_obs = ggml_view_3d(ctx, q, d, n_head, w, q->nb[1], q->nb[2], (T - w)*q->nb[2]);
        ggml_tensor * kq = ggml_mul_mat(ctx, kp, ggml_permute(ctx, q_obs, 0, 2, 1, 3)); // [n_kv, w, n_head]
        ggml_tensor * m = ggml_view_2d(ctx, mask, n_kv, w, mask->nb[1], (T - w)*mask->nb[1]);
        ggml_tensor * p = ggml_reshape_3d(ctx, ggml_soft_max_ext(ctx, kq, m, scale, 0.0f), n_kv, w*group, n_head_kv);
        ggml_tensor * s;
        if (which == SUM_TRANSPOSED) { // patches 0003-0009
            s = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, p, 1, 0, 2, 3)));
        } else {                       // patch 0010
            ggml_tensor * ones = ggml_fill_inplace(ctx, ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, w*group, n_head_kv), 1.0f);
            s = ggml_out_prod(ctx, p, ones);
        }
        ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, s, n_kv, n_head_kv), stat));
    }

    ggml_cplan plan = ggml_graph_plan(gf, n_threads, nullptr);
    std::vector<uint8_t> work(plan.work_size + 1);
    plan.work_data = work.data();
    for (int i = 0; i < 3; ++i) {
        ggml_graph_compute(gf, &plan); // warm up
    }
    const int reps = 30;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) {
        ggml_graph_compute(gf, &plan);
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
    ggml_free(ctx);
    return ms;
}

int main(int argc, char ** argv) {
    const int64_t n_kv = argc > 1 ? atoll(argv[1]) : 4352;
    const int n_threads = argc > 2 ? atoi(argv[2]) : 2;
    printf("%lld keys, %d threads: flash attention of the chunk %.2f ms; the statistic summed by a transposed "
           "copy + sum_rows %.2f ms, by out_prod %.2f ms\n", (long long) n_kv, n_threads,
           run(n_kv, n_threads, FLASH_ATTN), run(n_kv, n_threads, SUM_TRANSPOSED), run(n_kv, n_threads, SUM_OUT_PROD));
    return 0;
}
