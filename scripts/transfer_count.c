// Counts the synchronous host<->backend transfers libllama asks ggml for: preloaded by
// scripts/transfers_per_compression.py, which reads the counters with ctypes.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
struct ggml_tensor;
static long n_get, n_set, n_memset;
static void * base(void) { static void * h; if (!h) h = dlopen("libggml-base.so.0", RTLD_NOLOAD | RTLD_LAZY); return h; }
long shim_gets(void) { return n_get; }
long shim_sets(void) { return n_set; }
long shim_memsets(void) { return n_memset; }
void ggml_backend_tensor_get(const struct ggml_tensor * t, void * data, size_t off, size_t size) {
    static void (*f)(const struct ggml_tensor *, void *, size_t, size_t);
    if (!f) f = dlsym(base(), "ggml_backend_tensor_get");
    n_get++; f(t, data, off, size);
}
void ggml_backend_tensor_set(struct ggml_tensor * t, const void * data, size_t off, size_t size) {
    static void (*f)(struct ggml_tensor *, const void *, size_t, size_t);
    if (!f) f = dlsym(base(), "ggml_backend_tensor_set");
    n_set++; f(t, data, off, size);
}
void ggml_backend_tensor_memset(struct ggml_tensor * t, uint8_t v, size_t off, size_t size) {
    static void (*f)(struct ggml_tensor *, uint8_t, size_t, size_t);
    if (!f) f = dlsym(base(), "ggml_backend_tensor_memset");
    n_memset++; f(t, v, off, size);
}
