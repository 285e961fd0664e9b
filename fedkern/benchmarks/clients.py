"""Benchmarks of the clients family: one round of K = k local GD steps for n clients of m samples.

  local_steps_vs_loop    logistic regression (d = 100 features + bias, m = 50 samples each) by
                         ClientBatch.local_steps_, against a Python loop over clients with
                         torch.optim.SGD
  local_steps_vs_vmap    the same round against K steps of torch.func.vmap(grad(loss)) (eager)
  module_steps_vs_loop   the same round for an MLP 20-32-10 (cross-entropy, m = 50 samples) by
                         ModuleClients (torch.func + the fused clipping/update), against the loop

The records report the backend of local_steps_. Cases: n = 1000 clients, K = 10, m = 50 in the
quick and the full suite (custom sizes: 20 clients, K = 2, m = 10).
"""

from __future__ import annotations

import torch

from fedkern.benchmarks.core import (
    SEED,
    Case,
    Prepared,
    cases,
    min_bytes,
    nothing,
    register,
    restore,
)

CLIENT_OPS = ("local_steps_vs_loop", "local_steps_vs_vmap", "module_steps_vs_loop")
CLIENT_DIM = 100  # logistic-regression features per sample (plus a bias column)
MLP = (20, 32, 10)  # the generic-path model: in, hidden, classes
CLIENTS_CASE = (1000, 10, 50)  # n clients, K local steps, m samples per client


def _setup_clients(case, device, gen):
    """One round of K local GD steps for n clients of m samples each (see EAGER)."""
    from fedkern.clients import ClientBatch, ModuleClients
    from fedkern.problems import Problem

    n, K, m = case.n, case.k, case.m
    gamma = 0.1
    parts = [torch.arange(i * m, (i + 1) * m) for i in range(n)]
    if case.op == "module_steps_vs_loop":
        torch.manual_seed(SEED)
        model = torch.nn.Sequential(
            torch.nn.Linear(MLP[0], MLP[1]), torch.nn.Tanh(), torch.nn.Linear(MLP[1], MLP[2])
        ).to(device)
        inputs = torch.randn(n * m, MLP[0], generator=gen, device=device)
        targets = torch.randint(0, MLP[2], (n * m,), generator=gen, device=device)

        def loss(out, tgt):
            return torch.nn.functional.cross_entropy(out, tgt, reduction="none")

        mc = ModuleClients(model, loss, inputs, targets, parts)
        X0 = mc.flat().expand(n, -1).contiguous()
        X = X0.clone()
        fk = lambda: mc.local_steps_(X, gamma=gamma, steps=K)  # noqa: E731
        local = [torch.nn.Sequential(torch.nn.Linear(MLP[0], MLP[1]), torch.nn.Tanh(),
                                     torch.nn.Linear(MLP[1], MLP[2])).to(device)
                 for _ in range(2)]  # fmt: skip

        def eg():
            for i in range(n):
                net = local[i % 2]
                net.load_state_dict(model.state_dict())
                opt = torch.optim.SGD(net.parameters(), lr=gamma)
                xi, ti = inputs[i * m : (i + 1) * m], targets[i * m : (i + 1) * m]
                for _ in range(K):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(net(xi), ti).backward()
                    opt.step()

        return Prepared(
            fedkern=fk,
            eager=eg,
            rearm_fedkern=restore(X, X0),
            rearm_eager=nothing,
            nbytes=min_bytes(case),
            tensors={"X": X},
        )
    d = CLIENT_DIM + 1
    A = torch.randn(n * m, d, generator=gen, dtype=torch.float64)
    A[:, -1] = 1.0
    y = (torch.rand(n * m, generator=gen) < 0.5).double()
    problem = Problem(A.cpu(), y.cpu(), parts, "logistic", 1e-3)
    batch = ClientBatch(problem, device=device)
    X0 = torch.zeros(n, d, device=device)
    X = X0.clone()
    fk = lambda: batch.local_steps_(X, gamma=gamma, steps=K)  # noqa: E731
    Af, yf = batch.A.view(n, m, d), batch.y.view(n, m)
    l2 = problem.l2
    if case.op == "local_steps_vs_vmap":
        from torch.func import grad, vmap

        def objective(x, a, t):
            z = a @ x
            return torch.nn.functional.binary_cross_entropy_with_logits(z, t) + 0.5 * l2 * (x @ x)

        step = vmap(grad(objective))
        Y = X0.clone()

        def eg():
            for _ in range(K):
                Y.sub_(step(Y, Af, yf), alpha=gamma)

        rearm_eg = restore(Y, X0)
    else:
        W = [torch.nn.Linear(d, 1, bias=False).to(device) for _ in range(2)]

        def eg():
            for i in range(n):
                lin = W[i % 2]
                with torch.no_grad():
                    lin.weight.zero_()
                opt = torch.optim.SGD(lin.parameters(), lr=gamma, weight_decay=l2)
                for _ in range(K):
                    opt.zero_grad()
                    z = lin(Af[i])[:, 0]
                    torch.nn.functional.binary_cross_entropy_with_logits(z, yf[i]).backward()
                    opt.step()

        rearm_eg = nothing
    return Prepared(
        fedkern=fk,
        eager=eg,
        rearm_fedkern=restore(X, X0),
        rearm_eager=rearm_eg,
        nbytes=min_bytes(case),
        tensors={"X": X, "A": Af},
    )


def _footprint(case):  # the packed data (float64 oracle copy included)
    return case.n * case.m * (CLIENT_DIM + 2) * 16


# the data once per local step (it stays in cache between steps on a CPU)
for _op, _pos, _width, _eager in (
    ("local_steps_vs_loop", 800, CLIENT_DIM + 2,
     "for each client: torch.optim.SGD, K x (loss, backward, step)"),
    ("local_steps_vs_vmap", 810, CLIENT_DIM + 2,
     "K x torch.func.vmap(torch.func.grad(loss)) over the stacked clients"),
    ("module_steps_vs_loop", 820, MLP[0] + 1,
     "MLP: for each client: torch.optim.SGD, K x (loss, backward, step)"),
):  # fmt: skip
    register(_op, family="clients", setup=_setup_clients, eager=_eager, position=_pos,
             by_size=False, stacked=True, impl_op="local_steps_",
             footprint=_footprint, nbytes=lambda c, w=_width: c.n * c.m * w * 4)  # fmt: skip


@cases("clients")
def _cases(suite, device, sizes):
    if suite == "custom":
        return [Case(op, 20, 2, torch.float32, 10) for op in CLIENT_OPS]
    if suite == "quick":
        return [Case(op, *CLIENTS_CASE[:2], torch.float32, CLIENTS_CASE[2]) for op in CLIENT_OPS]
    return []
