"""The planted-bug campaign of issue 18: single-line mutants, one at a time, the relevant tests run.

  python tests/mutation_campaign.py [--only ID,ID] [--list]

Each mutant replaces one exact line fragment (it must occur once) in the C++ core, a Triton kernel
or the algorithm layer, runs its test selection with ``pytest -x -q`` and reverts the file. A
mutant is killed when the tests fail (a crash or an abort counts: it is a failure too, though a
clearer one is an assertion). C++ mutants rebuild fedkern._C incrementally with CMake in
``$FEDKERN_MUTATION_BUILD`` (default /tmp/fedkern-mutation-build; the module is written straight
into fedkern/; FEDKERN_MUTATION_CMAKE_ARGS adds configure arguments, e.g.
-DCMAKE_CXX_FLAGS_RELEASE=-O1 for faster rebuilds), and the clean module is rebuilt at the end.
Not collected by pytest (no test_ prefix); docs/testing.md records the last campaign's results.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (id, file, old, new, tests): tests are pytest arguments (the test files and a -k selection of
# the cases that concern the mutated line), run from the repository root.
MUTANTS = [
    (
        "microadam-w2-power",
        "fedkern/ops/microadam.py",
        '"w2": [_f32((1.0 - beta2) * beta2**a) for a in range(m)]',
        '"w2": [_f32((1.0 - beta2) * beta2 ** (a + 1)) for a in range(m)]',
        [
            "tests/test_planted_bugs.py",
            "tests/test_microadam.py",
            "-k",
            "microadam or (step_matches_oracle and cpu)",
        ],
    ),
    (
        "fedavg-server-lr",
        "fedkern/algorithms/federated.py",
        "self.x = self.x + self.server_lr * (self.batch.mean(Y) - self.x)\n        self.rounds",
        "self.x = self.x + 1.0 * (self.batch.mean(Y) - self.x)\n        self.rounds",
        ["tests/test_planted_bugs.py", "tests/test_resume.py", "-k", "server_lr or fedavg"],
    ),
    (
        "triton-topk-nan-key",
        "kernels/topk.py",
        "    return tl.where(u > 0x7F800000, 0x7F800001, u)",
        "    return u",
        [
            "tests/test_topk.py",
            "tests/test_planted_bugs.py",
            "-k",
            "triton and (nans or ties or special)",
        ],
    ),
    (
        "marina-alpha",
        "fedkern/algorithms/byzantine.py",
        "self._lam = self.alpha * float((x_new - self.x).norm())",
        "self._lam = float((x_new - self.x).norm())",
        ["tests/test_byzantine.py", "tests/test_planted_bugs.py", "-k", "alpha or marina_bad"],
    ),
    (
        "scaffold-cv-coefficient",
        "fedkern/algorithms/federated.py",
        "c_new = H + (self.x - Y) / (self.K * self.gamma)",
        "c_new = H + (self.x - Y) / self.gamma",
        ["tests/test_planted_bugs.py", "-k", "scaffold"],
    ),
    (
        "scaffold-server-cv-fraction",
        "fedkern/algorithms/federated.py",
        "self.c = self.c + (S.numel() / self.batch.n) * self.batch.mean(dc)",
        "self.c = self.c + self.batch.mean(dc)",
        ["tests/test_planted_bugs.py", "-k", "scaffold"],
    ),
    (
        "proxskip-l1-shift",
        "fedkern/algorithms/federated.py",
        "shift = self.gamma / self.p",
        "shift = self.gamma",
        ["tests/test_planted_bugs.py", "-k", "proxskip"],
    ),
    (
        "proxskip-l1-cv-step",
        "fedkern/algorithms/federated.py",
        "H += (self.p / self.gamma) * (x_new - X)",
        "H += (1.0 / self.gamma) * (x_new - X)",
        ["tests/test_planted_bugs.py", "-k", "proxskip"],
    ),
    (
        "proxskip-wrong-slot",
        "fedkern/algorithms/federated.py",
        "K = self.geometric(self.p, SLOT_COIN)",
        "K = self.geometric(self.p, SLOT_COHORT)",
        [
            "tests/test_planted_bugs.py",
            "tests/test_resume.py",
            "-k",
            "slot or proxskip or scaffnew",
        ],
    ),
    (
        "fedprox-mu-dropped",
        "fedkern/algorithms/federated.py",
        "self._local(Y, self.K, clients=S, mu=self.mu, anchor=self.x if self.mu else None)",
        "self._local(Y, self.K, clients=S)",
        ["tests/test_planted_bugs.py", "-k", "fedprox"],
    ),
    (
        "method-key-round-offset",
        "fedkern/algorithms/base.py",
        "return (self.rounds + 1) * SLOTS + v.integer",
        "return self.rounds * SLOTS + v.integer",
        ["tests/test_planted_bugs.py", "tests/test_resume.py", "-k", "slot or scaffnew"],
    ),
    (
        "marina-shift-back-target",
        "fedkern/algorithms/byzantine.py",
        "target = (x_new - self.x0) / self.gamma - self.g",
        "target = (x_new - self.x0) / self.gamma",
        ["tests/test_planted_bugs.py", "-k", "shift_back"],
    ),
    (
        "marina-alie-z-ignored",
        "fedkern/algorithms/byzantine.py",
        "return attacks.alie(honest_msgs, nb, self.alie_z)",
        "return attacks.alie(honest_msgs, nb)",
        ["tests/test_byzantine.py", "-k", "knob"],
    ),
    (
        "ipm-sign",
        "fedkern/robust/attacks.py",
        "row = -eps * honest.double().mean(0)",
        "row = eps * honest.double().mean(0)",
        ["tests/test_byzantine.py", "-k", "knob or formulas"],
    ),
    (
        "aggregator-f-override-ignored",
        "fedkern/robust/aggregator.py",
        "return R.trimmed_mean(X, f)",
        "return R.trimmed_mean(X, self.f)",
        ["tests/test_planted_bugs.py", "-k", "override"],
    ),
    (
        "microadam-c2-step",
        "fedkern/ops/microadam.py",
        '"c2": [_f32(1.0 / math.sqrt(1.0 - beta2**t)) for t in steps]',
        '"c2": [_f32(1.0 / math.sqrt(1.0 - beta2 ** (t + 1))) for t in steps]',
        [
            "tests/test_planted_bugs.py",
            "tests/test_microadam.py",
            "-k",
            "microadam or (step_matches_oracle and cpu)",
        ],
    ),
    (
        "triton-bf16-round-half-up",
        "kernels/topk.py",
        "r = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000",
        "r = (u + 0x7FFF) & 0xFFFF0000",
        ["tests/test_topk.py", "-k", "triton and ef14_topk_matches"],
    ),
    (
        "triton-randk-ef14-residual",
        "kernels/randk.py",
        "store_f32(y_ptr, idx, round_to(a - c, IS_BF16), mask, IS_BF16)",
        "store_f32(y_ptr, idx, round_to(a, IS_BF16), mask, IS_BF16)",
        ["tests/test_randk.py", "-k", "triton and ef14"],
    ),
    (
        "triton-sparse-alpha",
        "kernels/sparse.py",
        "acc = tl.where(hit, acc + alpha * v, acc)",
        "acc = tl.where(hit, acc + v, acc)",
        ["tests/test_sparse.py", "-k", "triton and batched"],
    ),
    (
        "triton-microadam-round",
        "kernels/microadam.py",
        "c = tl.floor(tl.math.div_rn(r - lo[:, None], tl.where(ok, sc, 1.0)) + 0.5)",
        "c = tl.floor(tl.math.div_rn(r - lo[:, None], tl.where(ok, sc, 1.0)))",
        ["tests/test_microadam.py", "-k", "triton and step_matches_oracle"],
    ),
    (
        "triton-clients-h-sign",
        "kernels/clients.py",
        "u = g - tl.load(h_ptr + xoffs, mask=pmask, other=0.0)",
        "u = g + tl.load(h_ptr + xoffs, mask=pmask, other=0.0)",
        ["tests/test_kernels_clients_triton.py"],
    ),
    (
        "cpp-topk-threshold-off-by-one",
        "csrc/cpu/topk.cpp",
        "const uint32_t thr = bin[need - 1];",
        "const uint32_t thr = bin[need];",
        [
            "tests/test_topk.py",
            "tests/test_planted_bugs.py",
            "-k",
            "cpu and (matches_oracle or nans or ties)",
        ],
    ),
    (
        "cpp-topk-ties-unlimited",
        "csrc/cpu/topk.cpp",
        "    if (key > thr || (key == thr && left > 0)) {",
        "    if (key >= thr) {",
        [
            "tests/test_topk.py",
            "tests/test_planted_bugs.py",
            "-k",
            "cpu and (matches_oracle or nans or ties)",
        ],
    ),
    (
        "cpp-topk-ties-not-consumed",
        "csrc/cpu/topk.cpp",
        "    ties -= t;\n",
        "\n",
        [
            "tests/test_topk.py",
            "tests/test_planted_bugs.py",
            "-k",
            "cpu and (matches_oracle or nans or ties)",
        ],
    ),
    (
        "cpp-sparse-alpha",
        "csrc/cpu/sparse.cpp",
        "const float term = alpha * T::load(vrow, p);",
        "const float term = T::load(vrow, p);",
        ["tests/test_sparse.py", "-k", "cpu and batched"],
    ),
    (
        "cpp-randk-scale",
        "csrc/cpu/randk.cpp",
        "const S c = T::round(a * scale);",
        "const S c = T::round(a);",
        ["tests/test_randk.py", "-k", "cpu and ef14"],
    ),
    (
        "cpp-microadam-quant-round",
        "csrc/cpu/microadam.cpp",
        "__m128 y = _mm_add_ps(_mm_div_ps(_mm_sub_ps(x, lo), scale), _mm_set1_ps(0.5f));",
        "__m128 y = _mm_div_ps(_mm_sub_ps(x, lo), scale);",
        ["tests/test_microadam.py", "-k", "cpu and step_matches_oracle"],
    ),
    (
        "cpp-clients-clip-strict",
        "csrc/cpu/clients.cpp",
        "    if (nrm > j.clip) {",
        "    if (nrm > 2.0 * j.clip) {",
        ["tests/test_kernels_clients_cpu.py"],
    ),
    (
        "cpp-clients-prox-sign",
        "csrc/cpu/clients.cpp",
        "for (int64_t k = 0; k < d; ++k) u[k] = u[k] + mu * (x[k] - a[k]);",
        "for (int64_t k = 0; k < d; ++k) u[k] = u[k] + mu * (a[k] - x[k]);",
        ["tests/test_kernels_clients_cpu.py"],
    ),
    (
        "tamuna-eta-default",
        "fedkern/algorithms/tamuna.py",
        "self.p * chi(c, self.s) if eta is None else eta",
        "self.p if eta is None else eta",
        ["tests/test_tamuna_method.py", "-k", "defaults or dense"],
    ),
    (
        "tamuna-pattern-key",
        "fedkern/algorithms/tamuna.py",
        "step=self.key(SLOT_PATTERN))",
        "step=self.key(SLOT_COIN))",
        ["tests/test_tamuna_method.py", "-k", "dense or nothing"],
    ),
    (
        "tamuna-h-not-stored",
        "fedkern/algorithms/tamuna.py",
        "        self.H[S] = H\n        self.x = x_new",
        "        self.x = x_new",
        ["tests/test_tamuna_method.py", "-k", "dense or sum_h"],
    ),
    (
        "tamuna-reference-drops-a-holder",
        "fedkern/reference/tamuna.py",
        "for j in range(1, s):",
        "for j in range(1, s - 1):",
        ["tests/test_tamuna_method.py", "-k", "dense or scaffnew"],
    ),
    (
        "cpp-tamuna-stride-sum-skips-last-holder",
        "csrc/cpu/tamuna.cpp",
        "    for (int64_t j = 1; j < s; ++j) {\n      x = X + o[j] + start;",
        "    for (int64_t j = 1; j < s - 1; ++j) {\n      x = X + o[j] + start;",
        ["tests/test_tamuna.py", "-k", "cpu or triton"],
    ),
    (
        "cpp-tamuna-coordinate-h-sign",
        "csrc/cpu/tamuna.cpp",
        "const float step = coef * (m - X[o[j] + r]);",
        "const float step = coef * (X[o[j] + r] - m);",
        ["tests/test_tamuna.py", "-k", "cpu or triton"],
    ),
    (
        "cpp-tamuna-next-slot",
        "csrc/cpu/tamuna.cpp",
        "    b += s;\n    if (b >= c) b -= c;\n  }\n}",
        "    b += s - 1;\n    if (b >= c) b -= c;\n  }\n}",
        ["tests/test_tamuna.py", "-k", "cpu or triton"],
    ),
    (
        "triton-tamuna-wrap",
        "kernels/tamuna.py",
        "slot = tl.where(slot >= c64, slot - c64, slot)\n        row = tl.load(perm_ptr + slot)",
        "slot = tl.where(slot > c64, slot - c64, slot)\n        row = tl.load(perm_ptr + slot)",
        ["tests/test_tamuna.py", "-k", "cpu or triton"],
    ),
    (
        "triton-tamuna-h-fma",
        "kernels/tamuna.py",
        "tl.store(h_ptr + offs, hv + coef * (xbar - xv), mask=cmask)",
        "tl.store(h_ptr + offs, hv + coef * xbar - coef * xv, mask=cmask)",
        ["tests/test_tamuna.py", "-k", "cpu or triton"],
    ),
    (
        "cpp-sketch-bern-keep-inclusive",
        "csrc/cpu/sketch.cpp",
        "return BernP{rng::keep_scale(t), static_cast<uint64_t>(t) << 8, p};",
        "return BernP{rng::keep_scale(t), (static_cast<uint64_t>(t) << 8) + 256, p};",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-bern-per-p-keep-inclusive",
        "csrc/cpu/sketch.cpp",
        "bits |= static_cast<uint64_t>(static_cast<float>(words[l] >> 8) < t) << l;",
        "bits |= static_cast<uint64_t>(static_cast<float>(words[l] >> 8) <= t) << l;",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-bern-apply-scale-1-over-p",
        "csrc/cpu/sketch.cpp",
        "const float s = bp.p ? rng::keep_scale(rng::keep_threshold(bp.p[j])) : bp.s_scalar;",
        "const float s = bp.p ? 1.0f / bp.p[j] : bp.s_scalar;",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-bern-step-scale-1-over-p",
        "csrc/cpu/sketch.cpp",
        "const float c = bp.p ? gamma * rng::keep_scale(rng::keep_threshold(bp.p[j])) : c_scalar;",
        "const float c = bp.p ? gamma / bp.p[j] : c_scalar;",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-bern-shared-rows-reversed",
        "csrc/cpu/sketch.cpp",
        "for (int64_t r = 0; r < rows; ++r) block(r, b * kBlock, masks);",
        "for (int64_t r = rows - 1; r >= 0; --r) block(r, b * kBlock, masks);",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-bern-no-v-not-zeroed",
        "csrc/cpu/sketch.cpp",
        "std::memset(orow + j0, 0, static_cast<size_t>(n) * sizeof(S));",
        "(void)0;",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-bern-kept-walk-off-by-one",
        "csrc/cpu/sketch.cpp",
        "fn(j0 + m * kMaskCoords + __builtin_ctzll(bits));",
        "fn(j0 + m * kMaskCoords + __builtin_ctzll(bits) / 2 * 2);",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-round-key-weyl",
        "csrc/cpu/sketch.cpp",
        "b += 0xBB67AE85u;",
        "b += 0x9E3779B9u;",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-base-scalar-keep-inclusive",
        "csrc/cpu/sketch.cpp",
        "bits |= static_cast<uint64_t>(words[l] < bp.lim) << l;",
        "bits |= static_cast<uint64_t>(words[l] <= bp.lim) << l;",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-avx2-upper-half-kept",
        "csrc/cpu/sketch.cpp",
        "const __m256i keep = _mm256_cmpgt_epi64(lim, _mm256_and_si256(c[w][v], low));",
        "const __m256i keep = _mm256_cmpgt_epi64(lim, c[w][v]);",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-avx2-counter-lanes",
        "csrc/cpu/sketch.cpp",
        "const __m256i lanes = _mm256_setr_epi64x(0, 1, 2, 3);",
        "const __m256i lanes = _mm256_setr_epi64x(0, 1, 2, 2);",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-avx512-spread",
        "csrc/cpu/sketch.cpp",
        "kSpread[b >> 4]) << 16;",
        "kSpread[b >> 4]) << 8;",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-avx512-tail-kept",
        "csrc/cpu/sketch.cpp",
        "masks[m + h] = bits & tail_bits(valid);",
        "masks[m + h] = bits;",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-base-tail-kept",
        "csrc/cpu/sketch.cpp",
        "    masks[m] = bits & tail_bits(valid);\n  }\n}\n\n#if",
        "    masks[m] = bits;\n  }\n}\n\n#if",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-avx2-tail-kept",
        "csrc/cpu/sketch.cpp",
        "    masks[m] = bits & tail_bits(valid);\n  }\n}\n\n// AVX-512",
        "    masks[m] = bits;\n  }\n}\n\n// AVX-512",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-perm-last-position-dropped",
        "csrc/cpu/sketch.cpp",
        "const int64_t p1 = std::min(p0 + kChunk, range[2 * r + 1]);",
        "const int64_t p1 = std::min(p0 + kChunk, range[2 * r + 1] - 1);",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-perm-shared-rows-reversed",
        "csrc/cpu/sketch.cpp",
        "for (int64_t r = 0; r < rows; ++r) for_perm_chunks(r, r + 1,",
        "for (int64_t r = rows - 1; r >= 0; --r) for_perm_chunks(r, r + 1,",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "cpp-sketch-perm-step-gamma",
        "csrc/cpu/sketch.cpp",
        "const float c = gamma * scale[r];",
        "const float c = scale[r];",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "triton-sketch-bern-keep-inclusive",
        "kernels/sketch.py",
        "keep = mask & ((word >> 8).to(tl.float32) < t)",
        "keep = mask & ((word >> 8).to(tl.float32) <= t)",
        ["tests/test_sketch.py", "-k", "triton"],
    ),
    (
        "triton-sketch-bern-row-keys",
        "kernels/sketch.py",
        "base = keys_ptr + r * 4",
        "base = keys_ptr + r * 0",
        ["tests/test_sketch.py", "-k", "triton"],
    ),
    (
        "triton-sketch-bern-dropped-is-x",
        "kernels/sketch.py",
        "w = tl.where(keep, vj + s * (xj - vj), vj)",
        "w = tl.where(keep, vj + s * (xj - vj), xj)",
        ["tests/test_sketch.py", "-k", "triton"],
    ),
    (
        "triton-sketch-bern-shared-step-association",
        "kernels/sketch.py",
        "xj = tl.where(keep, round_to(xj - (gamma * s) * gj, IS_BF16), xj)",
        "xj = tl.where(keep, round_to(xj - gamma * (s * gj), IS_BF16), xj)",
        ["tests/test_sketch.py", "-k", "triton"],
    ),
    (
        "triton-sketch-perm-step-gamma",
        "kernels/sketch.py",
        "c = gamma * tl.load(scale_ptr + r, mask=valid, other=0.0)",
        "c = tl.load(scale_ptr + r, mask=valid, other=0.0)",
        ["tests/test_sketch.py", "-k", "triton"],
    ),
    (
        "triton-sketch-perm-walk-stops-at-d",
        "kernels/sketch.py",
        "walking = walking & (x >= limit)",
        "walking = walking & (x > limit)",
        ["tests/test_sketch.py", "-k", "triton"],
    ),
    (
        "ref-sketch-bern-keep-inclusive",
        "fedkern/reference/sketch.py",
        "return c < T, s",
        "return c <= T, s",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "ref-sketch-bern-scale-1-over-p",
        "fedkern/reference/sketch.py",
        "s = (16777216.0 / T.double()).float()",
        "s = (1.0 / p.cpu().double()).float()",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "ref-sketch-perm-walk-stops-at-d",
        "fedkern/reference/sketch.py",
        "walk = walk[x[walk] >= d]",
        "walk = walk[x[walk] > d]",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "ref-sketch-apply-unscaled",
        "fedkern/reference/sketch.py",
        "out[idx] = (s * xf).to(x.dtype)",
        "out[idx] = xf.to(x.dtype)",
        ["tests/test_sketch.py", "-k", "not triton"],
    ),
    (
        "mast-dsgd-batch-slot",
        "fedkern/algorithms/mast.py",
        "self.key(SLOT_BATCH), count=b))",
        "self.key(SLOT_INDEX), count=b))",
        ["tests/test_mast.py", "-k", "minibatch"],
    ),
    (
        "mast-dsgd-batch-same-seed-every-client",
        "fedkern/algorithms/mast.py",
        "samples.append(permutation_tensor(m, client_seed(self.seed, i),",
        "samples.append(permutation_tensor(m, self.seed,",
        ["tests/test_mast.py", "-k", "minibatch"],
    ),
    (
        "mast-dsgd-batch-not-capped",
        "fedkern/algorithms/mast.py",
        "b = min(batch_size, m)",
        "b = min(batch_size, m - 1) if m > 1 else 1",
        ["tests/test_mast.py", "-k", "minibatch"],
    ),
    (
        "mast-dsgd-batch-client-sum",
        "fedkern/algorithms/mast.py",
        "return P.grads(w.double(), samples=samples).mean(0).float()",
        "return P.grads(w.double(), samples=samples).sum(0).float() / P.n ** 0.5",
        ["tests/test_mast.py", "-k", "minibatch"],
    ),
]


def build_dir() -> Path:
    return Path(os.environ.get("FEDKERN_MUTATION_BUILD", "/tmp/fedkern-mutation-build"))


def rebuild() -> None:
    """Incremental build of fedkern._C into fedkern/ (configured on first use)."""
    b = build_dir()
    if not (b / "CMakeCache.txt").exists():
        import pybind11

        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(b), "-G", "Ninja",
                        "-DCMAKE_BUILD_TYPE=Release", "-DFEDKERN_CUDA_CHECK=OFF",
                        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ROOT / 'fedkern'}",
                        f"-DPython_EXECUTABLE={sys.executable}",
                        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                        *os.environ.get("FEDKERN_MUTATION_CMAKE_ARGS", "").split()],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run(["cmake", "--build", str(b), "--target", "_C", "-j", "2"], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def run_one(mid, path, old, new, tests, timeout) -> tuple[str, float, str]:
    f = ROOT / path
    text = f.read_text()
    if text.count(old) != 1:
        return "not applied", 0.0, f"fragment occurs {text.count(old)} times"
    native = path.startswith("csrc/")
    t0 = time.monotonic()
    try:
        f.write_text(text.replace(old, new))
        if native:
            rebuild()
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        try:
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                 env=env)  # fmt: skip
        except subprocess.TimeoutExpired:
            return "killed (timeout)", time.monotonic() - t0, ""
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("FAILED")]
        lines += [ln for ln in out.stdout.splitlines() if ln.startswith("ERROR")]
        if out.returncode == 0:
            return "SURVIVED", time.monotonic() - t0, out.stdout.strip().splitlines()[-1]
        why = lines[0] if lines else (out.stdout + out.stderr).strip().splitlines()[-1]
        return "killed", time.monotonic() - t0, why
    finally:
        f.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m[0] in args.only.split(",")]
    if args.list:
        for m in chosen:
            print(f"{m[0]:32s} {m[1]}")
        return 0
    chosen.sort(key=lambda m: m[1].startswith("csrc/"))  # Python first: one final rebuild
    results = []
    try:
        for m in chosen:
            status, sec, why = run_one(*m, timeout=args.timeout)
            results.append((m[0], m[1], status, sec, why))
            print(f"{m[0]:32s} {status:16s} {sec:6.0f}s  {why}", flush=True)
    finally:
        if any(m[1].startswith("csrc/") for m in chosen):
            rebuild()
    killed = sum(r[2].startswith("killed") for r in results)
    print(f"\nkilled {killed} of {len(results)}")
    print("| mutant | file | result | first failing test |\n|---|---|---|---|")
    for mid, path, status, _, why in results:
        print(f"| {mid} | {path} | {status} | {why.replace('|', '/')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
