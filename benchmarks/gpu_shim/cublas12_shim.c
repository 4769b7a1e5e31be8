/* libcublas.so.12 for faiss-gpu-cu12 on a machine that has only cuBLAS 13.
 *
 * faiss's PyPI GPU wheel is built against CUDA 12 and names 8 cuBLAS entry points with the symbol
 * version "libcublas.so.12"; the GPU machines of this project carry CUDA 13. This library exports
 * exactly those 8 names under that version and jumps to cuBLAS 13's functions of the same name and
 * signature (unchanged between 12 and 13). Only benchmarks/gpu_check.py uses it.
 *
 *   gcc -O2 -shared -fPIC -Wl,--version-script=cublas12.map -Wl,-soname,libcublas.so.12 \
 *       -o libcublas.so.12 cublas12_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#define FORWARD(name)                                                                       \
    __attribute__((visibility("hidden"))) void *p_##name;                                  \
    __asm__(".globl " #name "\n.type " #name ",@function\n" #name ":\n"                    \
            "    jmp *p_" #name "(%rip)\n.size " #name ", .-" #name "\n");

FORWARD(cublasCreate_v2)
FORWARD(cublasDestroy_v2)
FORWARD(cublasGemmEx)
FORWARD(cublasGemmStridedBatchedEx)
FORWARD(cublasGetMathMode)
FORWARD(cublasSetMathMode)
FORWARD(cublasSetStream_v2)
FORWARD(cublasSgemmEx)

#define BIND(name)                                                                          \
    p_##name = dlsym(h, #name);                                                             \
    if (!p_##name) fprintf(stderr, "cublas12 shim: %s missing in %s\n", #name, path);

__attribute__((constructor)) static void bind(void) {
    const char *path = getenv("MOONSEARCH_CUBLAS13");
    if (!path) path = "libcublas.so.13";
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "cublas12 shim: cannot open %s: %s\n", path, dlerror());
        return;
    }
    BIND(cublasCreate_v2)
    BIND(cublasDestroy_v2)
    BIND(cublasGemmEx)
    BIND(cublasGemmStridedBatchedEx)
    BIND(cublasGetMathMode)
    BIND(cublasSetMathMode)
    BIND(cublasSetStream_v2)
    BIND(cublasSgemmEx)
}
