# faiss-gpu (PyPI, built for CUDA 12) on a GPU machine that carries only CUDA 13. Source it:
#
#   source benchmarks/gpu_shim/setup.sh PART...     # PART: pieces of the packed payload, in order
#
# The payload is faiss-gpu 1.15.1's `faiss/` and `faiss_gpu.libs/` plus CUDA 12's libcudart.so.12, packed
# here with `python benchmarks/gpu_check.py pack-faiss --out DIR` (58 MB in xz; it travels in pieces because
# a device call carries at most 64 MiB). This unpacks it to $MOONSEARCH_FAISS_GPU (default /tmp/faissgpu),
# builds libcublas.so.12 (cublas12_shim.c, forwarding faiss's 8 cuBLAS calls to cuBLAS 13) and an empty
# libcublasLt.so.12 (faiss names it but calls nothing in it), lays them out where faiss looks for the
# nvidia-*-cu12 wheels (nvidia/<name>/lib), and puts faiss on PYTHONPATH.
dest=${MOONSEARCH_FAISS_GPU:-/tmp/faissgpu}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$dest"
if [ ! -f "$dest/faiss/__init__.py" ]; then
    cat "$@" | xz -d | tar -x -C "$dest" || return 1
fi
# faiss's __init__ loads its CUDA 12 libraries from the nvidia-*-cu12 wheels' folders: lay them out so
nv="$dest/nvidia"
mkdir -p "$nv/cuda_runtime/lib" "$nv/cublas/lib" "$nv/curand/lib"
cp "$dest/cu12/libcudart.so.12" "$nv/cuda_runtime/lib/" || return 1
gcc -O2 -shared -fPIC -Wl,--version-script="$here/cublas12.map" -Wl,-soname,libcublas.so.12 \
    -o "$nv/cublas/lib/libcublas.so.12" "$here/cublas12_shim.c" -ldl || return 1
echo 'void moonsearch_empty(void) {}' > "$dest/empty.c"
gcc -shared -fPIC -Wl,--version-script="$here/cublasLt12.map" -Wl,-soname,libcublasLt.so.12 \
    -o "$nv/cublas/lib/libcublasLt.so.12" "$dest/empty.c" || return 1
py=$(python3 -c 'import sys; print(sys.prefix)')
if [ -z "${MOONSEARCH_CUBLAS13:-}" ]; then
    MOONSEARCH_CUBLAS13=$(find "$py" /usr/local/cuda* /usr/lib -name 'libcublas.so.13*' 2>/dev/null | head -1)
fi
# cuRAND kept its soname (libcurand.so.10) in CUDA 13; faiss loads it but this benchmark draws no random numbers
curand=$(find "$(dirname "$MOONSEARCH_CUBLAS13")" "$py" -name 'libcurand.so.10*' 2>/dev/null | head -1)
if [ -n "$curand" ]; then
    ln -sf "$curand" "$nv/curand/lib/libcurand.so.10"
else
    gcc -shared -fPIC -Wl,-soname,libcurand.so.10 -o "$nv/curand/lib/libcurand.so.10" "$dest/empty.c" || return 1
fi
export MOONSEARCH_CUBLAS13
export LD_LIBRARY_PATH="$nv/cuda_runtime/lib:$nv/cublas/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$dest${PYTHONPATH:+:$PYTHONPATH}"
echo "faiss-gpu from $dest, cuBLAS 13 at ${MOONSEARCH_CUBLAS13:-(not found)}"
