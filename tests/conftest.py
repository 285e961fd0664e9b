"""Shared test setup: backend parametrization, tolerances, the float64 oracle helpers.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors, which must be switched on
before triton is first imported -- hence the environment variable below, set before fedkern loads.
On CI (CI=true) a backend that should exist on this machine (the C++ core, Triton's interpreter)
failing to load is an error, not a skip, so a broken build cannot pass as skipped tests.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fedkern  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16]

#: Unit roundoff per dtype. Results are compared with the float64 oracle to within two roundings
#: of the result (rtol) and two roundings of the operands' magnitude (atol, for cancellation).
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


def _backend_param(name: str):
    ok, why = fedkern.ops._dispatch.backend_status(name)
    required = os.environ.get("CI") == "true" and name in ("cpu", "triton")
    # a backend that is installed but fails to load is a failure, never a skip
    if ok or required or fedkern.ops._dispatch.backend_broken(name):
        return pytest.param(name, id=name)
    return pytest.param(name, id=name, marks=pytest.mark.skip(reason=why))


BACKEND_PARAMS = [_backend_param(n) for n in ("reference", "cpu", "triton", "cuda")]


def device_for(backend: str) -> str:
    """Where a backend's test tensors live: CUDA for the GPU backends when a GPU exists."""
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return "cuda"
    return "cpu"


def interpreted(backend: str) -> bool:
    """Triton in its interpreter is ~1000x slower: such cases use smaller sizes."""
    return backend == "triton" and not HAS_CUDA


def backend_fixture(impls: dict):
    """A ``backend`` fixture over the backends that every op in ``impls`` (an ops module's IMPLS
    table) implements; each test body runs with that backend forced. A test module that covers an
    op family without a CUDA C++ kernel (its GPU path is Triton) overrides the fixture with it."""
    have = set.intersection(*(set(table) for table in impls.values()))

    @pytest.fixture(params=[p for p in BACKEND_PARAMS if p.values[0] in have])
    def backend(request):
        with fedkern.backend(request.param):
            yield request.param

    return backend


backend = backend_fixture({"all": dict.fromkeys(("reference", "cpu", "triton", "cuda"))})


def fresh_seed(what: str = "random inputs") -> int:
    """A fresh 32-bit seed per call, or FEDKERN_TEST_SEED when set (to replay a failure).

    The seed is printed, so pytest shows it in the captured output of a failing test, with the
    environment setting that replays it.
    """
    env = os.environ.get("FEDKERN_TEST_SEED")
    seed = int(env) if env else int.from_bytes(os.urandom(4), "little")
    print(f"{what}: seed {seed} (replay with FEDKERN_TEST_SEED={seed})")
    return seed


@pytest.fixture
def gen():
    """Fresh random inputs every run (``fresh_seed``): a torch.Generator."""
    return torch.Generator().manual_seed(fresh_seed("torch.Generator"))


def rand(n, dtype, gen, device="cpu", kind="normal"):
    """Random test vector: normal, or with many ties / zeros of both signs / inf / NaN."""
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    if kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=gen).double()
    elif kind == "special":
        x = torch.randint(-3, 4, (n,), generator=gen).double()
        specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")],
                                dtype=torch.float64)  # fmt: skip
        pick = torch.randint(0, 5, (n,), generator=gen)
        mask = torch.rand(n, generator=gen) < 0.3
        x = torch.where(mask, specials[pick], x)
    elif kind == "equal":
        x = torch.full((n,), 1.5, dtype=torch.float64)
    return x.to(dtype).to(device)


def oracle_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """float64/NumPy top-k indices: order by (NaN first, then |x| descending, then index)."""
    a = x.detach().double().cpu().flatten().numpy()
    nan = np.isnan(a)
    mag = np.where(nan, 0.0, np.abs(a))
    order = np.lexsort((np.arange(a.size), -mag, -nan.astype(np.int64)))
    return torch.from_numpy(np.sort(order[:k]))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of two float tensors (NaN payloads aside)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    both_nan = torch.isnan(a.float()) & torch.isnan(b.float())
    ia = a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32)
    ib = b.view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32)
    return bool(((ia == ib) | both_nan).all())


def close64(actual: torch.Tensor, expected64: torch.Tensor, dtype, scale: float = 0.0) -> None:
    """Compare with the float64 oracle: |a - e| <= 2 eps |e| + 2 eps scale (scale: operand size)."""
    eps = EPS[dtype]
    torch.testing.assert_close(
        actual.detach().cpu().double(), expected64.detach().cpu().double(), equal_nan=True,
        rtol=2 * eps, atol=2 * eps * scale + 1e-300,
    )  # fmt: skip


def assert_matches_reference(backend: str, run) -> None:
    """``run()`` under ``backend`` and under "reference" returns the same tensors, bit for bit."""
    results = {}
    for name in (backend, "reference"):
        with fedkern.backend(name):
            results[name] = run()
    for got, want in zip(results[backend], results["reference"], strict=True):
        assert same_bits(got, want) if got.is_floating_point() else torch.equal(got, want)


def require(module: str, *, in_ci: bool = False):
    """Import ``module`` for a test, skipping only when it is not installed.

    An import that fails for another reason (a broken build, a missing dependency of an installed
    package: any error but ModuleNotFoundError for ``module`` itself or a parent package) fails
    the test instead of hiding behind a skip; with ``in_ci=True`` a missing module is a failure
    too under CI=true (the C++ core and Triton must exist there).
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if not (module == missing or module.startswith(missing + ".")):
            raise  # the module exists, one of its own imports is missing: a real failure
        if in_ci and os.environ.get("CI") == "true":
            pytest.fail(f"{module} must be importable in CI: {exc}", pytrace=False)
        pytest.skip(f"{module} is not installed ({exc})", allow_module_level=True)
