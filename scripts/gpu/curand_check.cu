// Checks the spec's claim that a Gaussian direction equals cuRAND's curand_normal4 stream:
// direction (seed, step, d), block b  ==  curand_init(seed, step + 2^32 d, 4 b) + curand_normal4.
// Prints "seed step direction start value" lines for the given points, one value per element,
// for scripts/gpu/curand-check to compare with `hyzo directions`.
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <curand_kernel.h>

__global__ void normals(unsigned long long seed, unsigned int step, unsigned int dir,
                        unsigned long long first_block, int blocks, float4 *out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= blocks) return;
    curandStatePhilox4_32_10_t st;
    unsigned long long subsequence = (unsigned long long)step + ((unsigned long long)dir << 32);
    curand_init(seed, subsequence, 4ull * (first_block + i), &st);
    out[i] = curand_normal4(&st);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: curand_check SEED STEP DIRECTION FIRST_BLOCK BLOCKS\n");
        return 2;
    }
    unsigned long long seed = strtoull(argv[1], 0, 0);
    unsigned int step = (unsigned int)strtoul(argv[2], 0, 0);
    unsigned int dir = (unsigned int)strtoul(argv[3], 0, 0);
    unsigned long long first = strtoull(argv[4], 0, 0);
    int blocks = atoi(argv[5]);
    float4 *d, *h = (float4 *)malloc(sizeof(float4) * blocks);
    cudaError_t e = cudaMalloc(&d, sizeof(float4) * blocks);
    if (e == cudaSuccess) {
        normals<<<(blocks + 127) / 128, 128>>>(seed, step, dir, first, blocks, d);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e == cudaSuccess) e = cudaMemcpy(h, d, sizeof(float4) * blocks, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        // Said, not just an exit status: gpu-check's summary shows this line.
        fprintf(stderr, "curand_check: %s\n", cudaGetErrorString(e));
        return 1;
    }
    for (int i = 0; i < blocks; i++)
        printf("%.9g\n%.9g\n%.9g\n%.9g\n", h[i].x, h[i].y, h[i].z, h[i].w);
    cudaFree(d);
    free(h);
    return 0;
}
