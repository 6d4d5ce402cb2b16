"""How the LIF charge's division by tau may be computed in fp32, measured against IEEE division.

    python bench/division.py [--samples 2000000]

SpikingJelly (and fastsnn's reference) compute (x − (v − v_reset)) / tau with a correctly rounded fp32
division. A kernel may instead multiply by r = RN(1/tau) (1 instruction instead of ~10 for div.rn), or
multiply and correct the quotient with two fused multiply-adds (Markstein: q = RN(a·r), e = fma(−q, tau, a),
q' = fma(e, r, q)). This script counts, for several tau, how often each differs from the correctly
rounded quotient, and how often that flips a spike in a T-step LIF run on random and adversarial inputs
(membranes placed within a few ulps of the threshold). fma is emulated exactly (fastsnn.testing.fma32,
which the tests also use to run the kernels' GPU division under the interpreter).
"""
from __future__ import annotations

import argparse
from fractions import Fraction

import numpy as np

from fastsnn.testing import fma32

f32 = np.float32


def _round_f32(q: Fraction) -> f32:
    lo = f32(float(q))  # within an ulp; step to the nearest fp32 with ties to even
    candidates = [np.nextafter(lo, f32(-np.inf)), lo, np.nextafter(lo, f32(np.inf))]
    best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - q),
                                          int(np.frombuffer(np.float32(c).tobytes(), np.uint32)[0]) & 1))
    return f32(best)


def quotients(a, tau):
    # RN32 of the exact quotient (fp64 is exact enough: checked below)
    exact = (a.astype(np.float64) / np.float64(tau)).astype(f32)
    r = f32(1.0) / f32(tau)
    mul = (a * r).astype(f32)
    e = fma32(-mul, np.full_like(a, tau), a)
    corrected = fma32(e, np.full_like(a, r), mul)
    return exact, mul, corrected


def lif_spikes(x, tau, divide, v_threshold=1.0):
    """Spikes of a soft-reset LIF (decay_input=True, v_reset=0) over x[T, N] with the given division."""
    v = np.zeros(x.shape[1], f32)
    out = []
    for t in range(x.shape[0]):
        h = (v + divide(x[t] - v, tau)).astype(f32)
        s = h >= f32(v_threshold)
        v = np.where(s, h - f32(v_threshold), h).astype(f32)
        out.append(s)
    return np.stack(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2_000_000)
    parser.add_argument("--T", type=int, default=8)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    taus = [1.5, 2.0, 3.0, 1.1, 7.0, 10.0 / 3, 1.9999999]
    print("| tau | quotients differing: multiply | multiply + 2 fma | spikes flipped (random / adversarial): multiply "
          "| multiply + 2 fma |")
    print("|---|---|---|---|---|")
    for tau in taus:
        tau = f32(tau)
        a = (rng.standard_normal(args.samples) * 2).astype(f32)
        exact, mul, corrected = quotients(a, tau)
        # check the fp64-then-fp32 "exact" quotient against rational arithmetic on a subsample
        for i in rng.choice(args.samples, 2000, replace=False):
            assert exact[i] == _round_f32(Fraction(float(a[i])) / Fraction(float(tau)))
        d_mul, d_cor = int((mul != exact).sum()), int((corrected != exact).sum())
        divides = {"exact": lambda x, t: (x.astype(np.float64) / np.float64(t)).astype(f32),
                   "mul": lambda x, t: (x * (f32(1) / t)).astype(f32),
                   "fma": lambda x, t: quotients(x, t)[2]}
        n = args.samples // args.T
        random_x = (rng.standard_normal((args.T, n)) * 1.5 + 0.4).astype(f32)
        # adversarial: the first step lands h = x/tau within a few ulps of the threshold
        adv = np.tile(random_x[:1], (args.T, 1))
        adv[0] = (f32(tau) + (rng.integers(-4, 5, n) * np.spacing(f32(tau)))).astype(f32)
        flips = {}
        for name in ("mul", "fma"):
            flips[name] = []
            for x in (random_x, adv):
                ref = lif_spikes(x, tau, divides["exact"])
                flips[name].append(int((lif_spikes(x, tau, divides[name]) != ref).any(axis=0).sum()))
        print(f"| {float(tau):.7g} | {d_mul}/{args.samples} | {d_cor}/{args.samples} | "
              f"{flips['mul'][0]}/{n} / {flips['mul'][1]}/{n} | {flips['fma'][0]}/{n} / {flips['fma'][1]}/{n} |")


if __name__ == "__main__":
    main()
