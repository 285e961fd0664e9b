"""Shared test setup: backend parametrization, tolerances, the float64 oracle helpers.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors, which must be switched on
before triton is first imported -- hence the environment variable below, set before fedkern loads.
On CI (CI=true) a backend that should exist on this machine (the C++ core, Triton's interpreter)
failing to load is an error, not a skip, so a broken build cannot pass as skipped tests.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def _hypothesis_profiles() -> None:
    """hypothesis profiles: "ci" (the default: 20 examples per property, no example database, so
    a run writes nothing), "long" (1000 examples; ``pytest --hypothesis-profile long``). Failures
    print the seed and the blob that replays them (``@reproduce_failure``)."""
    try:
        from hypothesis import HealthCheck, settings
    except ModuleNotFoundError:  # tests/test_properties.py fails its import then; nothing else
        return
    common = {"deadline": None, "database": None, "print_blob": True,
              "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture]}  # fmt: skip
    settings.register_profile("ci", max_examples=20, **common)
    settings.register_profile("long", max_examples=1000, **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_hypothesis_profiles()


# ---- NumPy oracles of the exact ops (float32 arithmetic, rounded as the ops document) ----------


def np_bf16(x) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), as float32; every NaN -> 0x7fc00000."""
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return np.where(np.isnan(x), np.uint32(0x7FC00000), r).view(np.float32)


def np_round(x, dtype) -> np.ndarray:
    """round() of the ops: identity for float32, to nearest bfloat16 for bfloat16."""
    x = np.asarray(x, np.float32)
    return np_bf16(x) if dtype == torch.bfloat16 else x


def np_values(t: torch.Tensor) -> np.ndarray:
    """A float32/bf16 tensor's values as a new flat float32 array (exact)."""
    return t.detach().float().cpu().reshape(-1).numpy().astype(np.float32, copy=True)


def np_exact(got: torch.Tensor, want) -> bool:
    """Bit equality of a float tensor's values with a float32 array (NaN payloads aside)."""
    g = np_values(got)
    w = np.asarray(want, np.float32).reshape(-1)
    if g.shape != w.shape:
        return False
    return bool(((g.view(np.uint32) == w.view(np.uint32)) | (np.isnan(g) & np.isnan(w))).all())


def np_topk(a: np.ndarray, k: int) -> np.ndarray:
    return oracle_topk(torch.from_numpy(np.asarray(a, np.float64)), k).numpy()


def np_ef14_topk(g, e, k, lr, dtype):
    """(values, indices, new e) of ef14_topk_: a = round(e + round32(lr g)), top-k, zeroed."""
    a = np_round(e + (np.float32(lr) * g).astype(np.float32), dtype)
    idx = np_topk(a, k)
    vals = a[idx].copy()
    a[idx] = 0
    return vals, idx, a


def np_ef21_topk(g, s, k, dtype):
    """(values, indices, new s) of ef21_topk_: d = round(g - s), top-k, s[I] = round(s + d)."""
    d = np_round(g - s, dtype)
    idx = np_topk(d, k)
    s = s.copy()
    s[idx] = np_round(s[idx] + d[idx], dtype)
    return d[idx], idx, s


def np_sparse_add(dense, vals, idx, alpha, dtype) -> np.ndarray:
    """sparse_add_batched_: float32 accumulation in message order, rounded once."""
    acc = np.asarray(dense, np.float32).copy()
    for r in range(vals.shape[0]):
        acc[idx[r]] = (acc[idx[r]] + (np.float32(alpha) * vals[r]).astype(np.float32)).astype(
            np.float32
        )
    return np_round(acc, dtype)


def np_coordinate_median(x: np.ndarray, dtype) -> np.ndarray:
    """Column medians: the middle of the stable sort (NaN last), or round((lo + hi) * 0.5)."""
    n = x.shape[0]
    s = np.sort(np.asarray(x, np.float32), axis=0, kind="stable")
    if n % 2:
        return s[(n - 1) // 2]
    with np.errstate(invalid="ignore", over="ignore"):
        return np_round(np_round(s[n // 2 - 1] + s[n // 2], dtype) * np.float32(0.5), dtype)


def np_trimmed_mean(x: np.ndarray, f: int, dtype) -> np.ndarray:
    """Ranks f..n-f-1 of a stable column sort kept, summed in float32 in row order, / (n - 2f)."""
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")
    keep = np.zeros(x.shape, bool)
    np.put_along_axis(keep, order[f : n - f], True, axis=0)
    total = np.zeros(x.shape[1], np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for i in range(n):
            total = np.where(keep[i], (total + x[i]).astype(np.float32), total)
        return np_round(total / np.float32(n - 2 * f), dtype)


# ---- the tolerance table: the documented contract of every op --------------------------------
#
# "exact": the op promises identical bits on every backend and the suite checks them against a
# NumPy/float64 oracle that reproduces its rounding (tests/test_properties.py and the per-op files).
# Otherwise (rtol_ulps, atol_ulps): |got - want| <= eps * (rtol_ulps |want| + atol_ulps * scale),
# eps the dtype's unit roundoff (EPS), scale the operands' magnitude named in the note; these are
# the real bounds of ops whose sums or norms may be taken in another order per backend.
TOLERANCES = {
    "topk_compress": "exact",
    "ef14_topk_": "exact",
    "ef21_topk_": "exact",
    "randk_compress": "exact",
    "ef14_randk_": "exact",
    "ef21_randk_": "exact",
    "sparse_add_": "exact",
    "sparse_add_batched_": "exact",
    "coordinate_median": "exact",
    "trimmed_mean": "exact",
    "weighted_sum": "exact",
    # state exact; parameters: one rounding plus float32 moments, relative 2**-20 of the step
    "microadam_step_": (2, 2.0**-20 / 2.0**-24),  # scale: the step's largest |update|
    # float64 norm (order-dependent in its last bits) then fp32(c / ||x||) * x rounded once
    "clip_rows_": (4, 0),
    # per iteration: a float64 mean of clipped rows, v rounded to float32 (8 ulps of max|x| + tau)
    "centered_clip": (8, 8),  # scale: (max |x| + tau) * iterations
    # K local fp32 steps against float64: relative 1e-4 (kernels' RTOL in their test files)
    "local_steps_": (1e-4 / 2.0**-24, 1e-5 / 2.0**-24),  # scale: max |x|
}


def tolerance(op: str, dtype=torch.float32, scale: float = 1.0) -> dict:
    """``torch.testing.assert_close`` keywords of ``op``'s bound (TOLERANCES); rtol = atol = 0
    for the exact ops."""
    entry = TOLERANCES[op]
    if entry == "exact":
        return {"rtol": 0.0, "atol": 0.0}
    r, a = entry
    eps = EPS[dtype]
    return {"rtol": r * eps, "atol": a * eps * scale + 1e-300}


_GRID_CLASS: list = []


def in_process_grid():
    """A Flower ``Grid`` (flwr.serverapp.grid) that runs each node's ClientApp in this process
    with a persistent ``Context`` per node: ``InProcessGrid(app, node_ids, node_config=None)``
    (node_config(i) -> dict, default {"partition-id": i}); ``send_and_receive`` delivers every
    message to ``deliver(message, context)`` (override it to inject failures). The class is built
    on first use, so this module does not import flwr."""
    if _GRID_CLASS:
        return _GRID_CLASS[0]
    from flwr.app import Context, Message, RecordDict
    from flwr.serverapp.grid import Grid

    class InProcessGrid(Grid):
        def __init__(self, app, node_ids, node_config=None):
            self.app = app
            node_config = node_config or (lambda i: {"partition-id": i})
            self.contexts = {
                nid: Context(run_id=1, node_id=nid, state=RecordDict(), run_config={},
                             node_config=node_config(i))
                for i, nid in enumerate(node_ids)
            }  # fmt: skip

        # Grid's run bookkeeping and asynchronous push / pull are not used in process
        def set_run(self, run):
            raise NotImplementedError("an in-process grid has no run to set")

        @property
        def run(self):
            raise NotImplementedError("an in-process grid has no run")

        def push_messages(self, messages):
            raise NotImplementedError("an in-process grid only answers send_and_receive")

        def pull_messages(self, message_ids):
            raise NotImplementedError("an in-process grid only answers send_and_receive")

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                           group_id=group_id)  # fmt: skip

        def get_node_ids(self):
            return list(self.contexts)

        def deliver(self, message, context):
            return self.app(message, context)

        def send_and_receive(self, messages, *, timeout=None):
            out = []
            for m in messages:
                reply = self.deliver(m, self.contexts[m.metadata.dst_node_id])
                if reply is not None:
                    out.append(reply)
            return out

    _GRID_CLASS.append(InProcessGrid)
    return InProcessGrid


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the Python calls that read a tensor's values on the host (``bool``, ``int``,
    ``float``, ``item``, ``tolist``, ``cpu``, ``numpy``): each is a host synchronization on CUDA.
    ``host_reads()`` gives the count so far; a test asserts a hot-path call makes none."""
    count = [0]
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu",
                 "numpy"):  # fmt: skip
        orig = getattr(torch.Tensor, name)

        def counted(self, *args, _orig=orig, **kwargs):
            count[0] += 1
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return lambda: count[0]


# ---- Flower test helpers (the Flower strategy tests and the examples' tests) -------------------


@pytest.fixture
def flower_process():
    """The process identity Flower's runtime sets before a ServerApp runs (``Message`` reads it),
    and warnings from Flower's logger (the tests read some); both restored afterwards."""
    import logging

    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
    logging.getLogger("flwr").setLevel(logging.ERROR)


_FAULT_GRID_CLASS: list = []


def fault_grid(action: str | None = None):
    """``in_process_grid()`` with failure injection: ``FaultGrid(app, node_ids, fault=None,
    node_config=None)``. ``fault(action, round, client_id)`` (read from the message's fedkern
    ConfigRecord) returns None (deliver), "drop" (an error reply, the node never sees the
    message), "lose" (delivered, an error reply instead of the node's), "vanish" (delivered, no
    reply: a timeout) or ``tamper(reply, request) -> reply``. ``action`` given: ``fault(round,
    client_id)`` is asked for messages of that type only. ``context(i)`` is node i's Context."""
    for key, cls in _FAULT_GRID_CLASS:
        if key == action:
            return cls
    from flwr.app import Error, Message

    from fedkern.integrations.flower import protocol as P

    class FaultGrid(in_process_grid()):
        def __init__(self, app, node_ids, fault=None, node_config=None):
            super().__init__(app, node_ids, node_config)
            self.node_ids = list(node_ids)
            self.fault = fault

        def what(self, m):
            if self.fault is None:
                return None
            cfg = m.content.config_records.get(P.RECORD, {})
            kind = m.metadata.message_type
            if action is None:
                return self.fault(kind, cfg.get("round"), cfg.get("client_id"))
            return self.fault(cfg.get("round"), cfg.get("client_id")) if kind == action else None

        def deliver(self, m, ctx):
            what = self.what(m)
            if what == "drop":
                return Message(Error(code=1, reason="dropped"), reply_to=m)
            reply = self.app(m, ctx)
            if what == "vanish":
                return None
            if what == "lose":
                return Message(Error(code=2, reason="reply lost"), reply_to=m)
            if callable(what):
                return what(reply, m)
            return reply

        def context(self, i):
            return self.contexts[self.node_ids[i]]

    _FAULT_GRID_CLASS.append((action, FaultGrid))
    return FaultGrid


@pytest.fixture
def load_example(monkeypatch):
    """``load_example(folder, package, reset=("RESULTS",))`` imports an example Flower app's
    modules (examples/<folder>/<package>: client_app, server_app, task), clears the named
    module-level containers of server_app / client_app, and unloads the package afterwards."""
    import importlib
    import sys
    from pathlib import Path

    loaded = []

    def load(folder, package, reset=(("server_app", "RESULTS"),)):
        root = Path(__file__).resolve().parent.parent / "examples" / folder
        monkeypatch.syspath_prepend(str(root))
        mods = [importlib.import_module(f"{package}.{m}") for m in ("client_app", "server_app",
                                                                     "task")]  # fmt: skip
        loaded.append(package)
        names = dict(zip(("client_app", "server_app", "task"), mods, strict=True))
        for mod, attr in reset:
            getattr(names[mod], attr).clear()
        return tuple(mods)

    yield load
    for package in loaded:
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]


@pytest.fixture
def ray_example(monkeypatch):
    """``ray_example((client_app, server_app, task), rounds, supernodes)`` runs an example app
    (from ``load_example``) in Flower's simulation engine (Ray; skipped without it) with its
    pyproject settings but ``rounds`` server rounds (the server runs in this process, so only its
    round count is overridden; the clients read the pyproject's settings in Ray's workers), and
    returns ``(result, defaults)``: the server's last Result and the app's default configuration.
    ``final_model(result)`` reads the model."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs flwr[simulation] (Ray)")
    from flwr.simulation import run_simulation

    def run(app, rounds, supernodes):
        client_app, server_app, task = app
        config = task.config
        monkeypatch.setattr(task, "config",
                            lambda ctx: {**config(ctx), "num-server-rounds": rounds})  # fmt: skip
        backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                   "init_args": {"num_cpus": 2, "include_dashboard": False}}  # fmt: skip
        run_simulation(server_app=server_app.app, client_app=client_app.app,
                       num_supernodes=supernodes, backend_config=backend)  # fmt: skip
        return server_app.RESULTS[-1], config(type("Ctx", (), {"run_config": {}})())

    return run


def final_model(result):
    """The server model of a Flower ``Result`` (ArrayRecord "x"): a torch tensor."""
    import numpy as np

    return torch.from_numpy(np.array(result.arrays["x"].numpy()))


@pytest.fixture(scope="module")
def cancer():
    """The bundled breast-cancer data (A [569, 30] float32, y [569] float32), once per module."""
    from fedkern import data

    return data.load("breast_cancer")


def cancer_batch(cancer, n: int, l2: float = 0.05):
    """A ClientBatch of the breast-cancer logistic problem over n label-sorted clients (seed 3):
    the Flower strategy tests' problem."""
    from fedkern import data
    from fedkern.clients import ClientBatch
    from fedkern.problems import Problem

    A, y = cancer
    return ClientBatch(Problem(A, y, data.split(y, n, "label_sorted"), "logistic", l2), seed=3)


# ---- the CPU emulator of the CUDA C++ kernels (tests/cuda_emu; tests/test_cuda_emu*.py) -------

CUDA_EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"
CUDA_SRC_DIR = Path(__file__).resolve().parents[1] / "csrc" / "cuda"


@pytest.fixture(scope="session")
def libemu(tmp_path_factory):
    """The emulator with csrc/cuda/topk.cu and microadam.cu as a shared library (ctypes), built with
    g++ once per session (tests/cuda_emu/emu.cpp says which variants it registers). The alignment
    sanitizer makes a misaligned vector access (a fault on the GPU) kill the run with SIGILL."""
    gxx = shutil.which("g++")
    why = None
    if sys.platform != "linux":
        why = "needs Linux (ucontext)"
    elif gxx is None:
        why = "needs g++"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the CPU emulation of the CUDA kernels {why}", pytrace=False)
        pytest.skip(f"the CPU emulation of the CUDA kernels {why}")
    lib = tmp_path_factory.mktemp("cuda_emu") / "libemu.so"
    cmd = [gxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-Wall", "-Werror"]
    cmd += ["-Wno-unknown-pragmas", "-fsanitize=alignment", "-fsanitize-undefined-trap-on-error"]
    cmd += [f"-I{CUDA_SRC_DIR}", str(CUDA_EMU_DIR / "emu.cpp")]
    cmd += ["-o", str(lib)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}\n{build.stdout}{build.stderr}", pytrace=False)
    dll = ctypes.CDLL(str(lib))
    dll.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint]  # name, grid, block
    dll.emu_launch.argtypes += [ctypes.POINTER(ctypes.c_uint64), ctypes.c_char_p]  # args, types
    dll.emu_launch.argtypes += [ctypes.c_ulonglong]  # seed
    dll.emu_launch.restype = ctypes.c_int
    dll.emu_error.restype = ctypes.c_char_p
    return dll


def emu_launch(dll, func, grid, block, args, seed) -> None:
    """Runs kernel ``func`` of the `libemu` library on a 1-D grid with the launcher's arguments
    (fedkern.cuda.runtime.ptr / u64 / i64 / f32); ``seed`` drives block order and interleaving."""
    assert len(grid) == 1 and len(block) == 1 and grid[0] >= 1
    raw, types = [], ""
    for a in args:
        if isinstance(a, np.float32):
            raw.append(int(np.array(a).view(np.uint32)))
            types += "f"
        elif isinstance(a, np.uint64 | np.int64):
            raw.append(int(a) & (2**64 - 1))
            types += "q"
        else:
            raise TypeError(f"{func}: argument of type {type(a)}")
    arr = (ctypes.c_uint64 * len(raw))(*raw)
    rc = dll.emu_launch(func.encode(), grid[0], block[0], arr, types.encode(), seed)
    assert rc == 0, f"{func}: {dll.emu_error().decode()}"


class GuardedTorch:
    """Stands in for `torch` inside a launcher (fedkern.cuda.topk, .microadam). Its buffers from
    empty() / zeros() lie between two guard zones of poison bytes, and empty() ones are poisoned
    inside too: check() finds writes past either end (else silent heap corruption, or a crash
    later), and a read of memory that no kernel wrote yields poison instead of whatever was there;
    wrap() puts a copy of a test's own tensor between guard zones as well."""

    GUARD = 256  # bytes on each side; a multiple of 16 keeps the launcher's alignment
    POISON = 0xA5

    def __init__(self):
        self.buffers: list[tuple[torch.Tensor, int, int]] = []  # (bytes, first, end) of each

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, size, *, dtype, device=None):
        assert torch.device(device).type == "cpu"
        item = torch.empty((), dtype=dtype).element_size()
        base = torch.full((size * item + 2 * self.GUARD,), self.POISON, dtype=torch.uint8)
        self.buffers.append((base, self.GUARD, self.GUARD + size * item))
        return base[self.GUARD : self.GUARD + size * item].view(dtype)

    def zeros(self, size, *, dtype, device=None):
        return self.empty(size, dtype=dtype, device=device).zero_()

    def wrap(self, t, offset=0):
        """A guarded copy of tensor t (same shape, dtype and values), checked with the rest;
        offset: it starts that many elements past the buffer's 16-byte aligned start."""
        out = self.empty(t.numel() + offset, dtype=t.dtype, device=t.device)[offset:]
        return out.copy_(t.reshape(-1)).view(t.shape)

    def check(self, what):
        for base, first, end in self.buffers:
            bad = (base[:first] != self.POISON).sum() + (base[end:] != self.POISON).sum()
            assert bad == 0, f"{what}: {int(bad)} bytes written out of a {end - first}-byte buffer"
        self.buffers.clear()
