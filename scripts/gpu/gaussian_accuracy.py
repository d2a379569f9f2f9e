"""The accuracy of hyzo's Gaussian directions on a device, against the spec's f64 formula.

Usage: ``python gaussian_accuracy.py [--device cuda|cpu] [--log2n 28]`` (run by gpu-check
on the GPU with 2^28 entries; by scripts/gpu-rehearse on the CPU with a few thousand, which
tests this check itself where there is no GPU).

How: a float32 parameter of zeros, given a global offset past 2^32 elements, and one
``hyzo.torch.ZO`` step with ``eps = 1``: the first loss evaluation sees ``0 + 1·z = z``
exactly, and the closure keeps a copy. The reference is the spec's formula (docs/spec.md
§1-§3: Philox4x32-10, Box-Muller) in float64, evaluated with torch on the same device in
chunks. Two cross-checks guard the check itself: the f64 formula must agree with
``hyzo.directions`` (the CPU's f32 algorithm) within its tested bound, and the device's
values are compared with ``hyzo.directions`` bit for bit over the first entries (the kernels
mirror that algorithm operation for operation).

Prints the worst ``|z - z_f64| / (1 + |z_f64|)`` against the spec's tolerance (1e-4). Exit
status: 0 within the tolerance, 1 above it, 3 when the check itself is wrong (the formula
here disagrees with hyzo.directions: a mapping of seed, step or direction changed).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

import hyzo
import hyzo.torch as ht

SEED = 0x5EED_0F_2028
STEP = 0  # the first step of a fresh optimizer
DIRECTION = 0  # its first direction, the one the first evaluation perturbs with
# Past 2^32 elements, and not a multiple of 4, so both counter words and every lane are used.
OFFSET = (3 << 32) + 5
SPEC_TOLERANCE = 1e-4  # docs/spec.md: |z - exact| <= 1e-4 (1 + |z|) for an fp32 implementation
F32_BOUND = 2e-6  # what the CPU's f32 algorithm is tested to (src/direction.rs)
CHUNK = 1 << 24  # entries per chunk of the f64 reference (memory bound: ~1 GiB of temporaries)

MASK = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32_10(c: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding 32-bit words. A 32x32-bit product fits in 64
    bits; int64 multiplication wraps, and masking recovers the high and low words."""
    k0, k1 = key
    c0, c1, c2, c3 = c
    for _ in range(10):
        p0 = c0 * PHILOX_M[0]
        p1 = c2 * PHILOX_M[1]
        hi0, lo0 = (p0 >> 32) & MASK, p0 & MASK
        hi1, lo1 = (p1 >> 32) & MASK, p1 & MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W[0]) & MASK, (k1 + PHILOX_W[1]) & MASK
    return [c0, c1, c2, c3]


def gaussian_f64(start: int, count: int, device: str) -> torch.Tensor:
    """Entries ``start .. start + count`` of direction (SEED, STEP, DIRECTION), in f64:
    block ``b`` is Philox of counter ``(lo32 b, hi32 b, step, direction)`` under key
    ``(lo32 seed, hi32 seed)``; lanes (0, 1) are ``ρ sin v, ρ cos v`` of words (x0, x1),
    lanes (2, 3) the same of (x2, x3); ``u = (2x + 1) 2^-33``, ``v = 2π (2y + 1) 2^-33``."""
    first, last = start // 4, (start + count - 1) // 4
    b = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    words = philox4x32_10([b & MASK, b >> 32, torch.full_like(b, STEP),
                           torch.full_like(b, DIRECTION)], (SEED & MASK, SEED >> 32))
    out = torch.empty(4 * len(b), dtype=torch.float64, device=device)
    for pair in (0, 1):
        x, y = words[2 * pair].double(), words[2 * pair + 1].double()
        u = (2.0 * x + 1.0) * 2.0**-33
        v = (2.0 * math.pi) * ((2.0 * y + 1.0) * 2.0**-33)
        rho = torch.sqrt(-2.0 * torch.log(u))
        out[2 * pair::4] = rho * torch.sin(v)
        out[2 * pair + 1::4] = rho * torch.cos(v)
    skip = start - 4 * first
    return out[skip:skip + count]


def device_values(n: int, device: str) -> torch.Tensor:
    """z of (SEED, STEP, DIRECTION) at OFFSET.. as hyzo writes it on ``device``."""
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float32, device=device))
    ht.set_global_offset(p, OFFSET)
    opt = ht.ZO([p], lr=0.0, eps=1.0, seed=SEED, num_directions=1, directions="gaussian")
    seen: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        if not seen:
            seen.append(p.detach().clone())
        return torch.zeros((), device=device)

    opt.step(closure)
    return seen[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--log2n", type=int, default=28)
    args = ap.parse_args()
    dev, n = args.device, 1 << args.log2n
    t0 = time.time()
    if dev == "cuda" and not (torch.cuda.is_available() and hyzo.cuda_available()):
        print("skipped: no CUDA device (torch or libhyzo sees none)")
        return 2
    where = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"gaussian accuracy: {dev} ({where}), 2^{args.log2n} entries of direction "
          f"(seed {SEED:#x}, step {STEP}, d {DIRECTION}) from global index {OFFSET}")

    # The check itself: the f64 formula here against hyzo's CPU f32 algorithm.
    probe = min(4096, n)
    cpu_f32 = torch.from_numpy(np.asarray(hyzo.directions("gaussian", SEED, STEP, DIRECTION,
                                                          OFFSET, probe), dtype=np.float32))
    ref = gaussian_f64(OFFSET, probe, "cpu")
    self_err = float(((cpu_f32.double() - ref).abs() / (1.0 + ref.abs())).max())
    print(f"check of the check: f64 formula vs hyzo.directions (CPU f32), {probe} entries: "
          f"worst {self_err:.2e} (bound {F32_BOUND:.0e})")
    if not self_err <= F32_BOUND:
        print("THE CHECK IS WRONG: its formula disagrees with hyzo.directions (seed, step or "
              "direction mapping changed?); no verdict on the device")
        return 3

    z = device_values(n, dev)
    head = z[:probe].cpu()
    same = int((head.view(torch.int32) == cpu_f32.view(torch.int32)).sum())
    print(f"device vs hyzo.directions (CPU f32 algorithm), first {probe} entries: "
          f"{same}/{probe} bit-identical")
    if same != probe:
        print("THE DIRECTION THE CHECK READ IS NOT (seed, step 0, d 0) at the offset "
              "(hyzo.torch's mapping changed?), or the device differs from the CPU algorithm")

    worst, worst_at, largest, nonfinite = 0.0, 0, 0.0, 0
    for lo in range(0, n, CHUNK):
        cnt = min(CHUNK, n - lo)
        exact = gaussian_f64(OFFSET + lo, cnt, dev)
        got = z[lo:lo + cnt].double()
        nonfinite += int((~torch.isfinite(got)).sum())
        err = (got - exact).abs() / (1.0 + exact.abs())
        err = torch.nan_to_num(err, nan=math.inf)
        e, i = torch.max(err, 0)
        if float(e) > worst:
            worst, worst_at = float(e), lo + int(i)
        largest = max(largest, float(exact.abs().max()))
    exact_at = float(gaussian_f64(OFFSET + worst_at, 1, "cpu")[0])
    ok = worst <= SPEC_TOLERANCE and same == probe
    verdict = ("ABOVE THE SPEC'S TOLERANCE" if worst > SPEC_TOLERANCE
               else "within the spec, above the CPU algorithm's bound" if worst > F32_BOUND
               else "ok")
    print(f"worst |z - z_f64| / (1 + |z_f64|) = {worst:.3e} at global index {OFFSET + worst_at} "
          f"({dev} {float(z[worst_at]):.9e}, f64 {exact_at:.9e}); largest |z| {largest:.3f}; "
          f"non-finite {nonfinite}; spec tolerance {SPEC_TOLERANCE:.0e}, f32 algorithm bound "
          f"{F32_BOUND:.0e}: {verdict}")
    print(f"done in {time.time() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
