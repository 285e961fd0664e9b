"""CLERR and Clipped RR-CLI train a neural network (an MLP on digits, label-sorted clients) through
``ModuleBatch``, the ClientBatch interface over ``ModuleClients``.

Setup: digits (1797 x 64 + bias), 297 held-out test samples (a keyed permutation), the rest sorted
by label into 10 clients (heterogeneous: each client sees one or two digits); MLP 65 -> 32 (tanh) ->
10, cross-entropy; batch 32 (5 RR steps per client epoch). Learning-rate grid measured (30 rounds):
gamma in {0.1, 0.3} with c0 = c1 = 1 / (5 gamma) (theta = one epoch's step at small ||g||), eta =
5 gamma for RR-CLI: test accuracy CLERR 0.919 / 0.946, RR-CLI 0.933 / 0.949. The test runs gamma
= 0.3 for 12 rounds; the bar is 0.85; the control is the untrained model (same bar, fails).
"""

from __future__ import annotations

import torch

from fedkern import data
from fedkern.algorithms import CLERR, ClippedRRCLI
from fedkern.clients import ModuleBatch, ModuleClients
from fedkern.random import permutation_tensor

BAR = 0.85


def setup():
    A, y = data.load("digits")
    A = A.float()
    perm = permutation_tensor(A.shape[0], 0)
    test, train = perm[:297], perm[297:]
    parts = [train[p] for p in data.split(y[train], 10, "label_sorted")]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(65, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))

    def loss(out, t):
        return torch.nn.functional.cross_entropy(out, t, reduction="none")

    mc = ModuleClients(net, loss, A, y, parts)
    return ModuleBatch(mc, seed=0, test=(A[test], y[test])), mc.flat()


def test_clerr_and_clipped_rr_cli_train_an_mlp():
    mb, x0 = setup()
    gamma, s = 0.3, 5
    kw = {"gamma": gamma, "c0": 1 / (gamma * s), "c1": 1 / (gamma * s), "batch_size": 32,
          "x0": x0, "record_every": 12}  # fmt: skip
    clerr = CLERR(mb, **kw)
    rr = ClippedRRCLI(mb, cohort=2, eta=gamma * s, **kw)
    accs = {"untrained": mb.accuracy(x0)}
    for name, m in (("clerr", clerr), ("clipped rr-cli", rr)):
        m.run(12)
        accs[name] = mb.accuracy(m.x)
        assert m.diverged_at is None
        assert m.history["loss"][-1] < m.history["loss"][0]
    print(accs)
    assert accs["clerr"] > BAR and accs["clipped rr-cli"] > BAR
    assert not accs["untrained"] > BAR


def test_module_batch_rr_matches_a_loop_of_minibatch_steps():
    """ModuleBatch's rr epoch equals plain per-client SGD over the same keyed permutation."""
    from fedkern.random import client_seeds, randk_keys_tensor
    from fedkern.reference.clients import permutation

    mb, x0 = setup()
    mc = mb.clients
    X = x0.expand(2, -1).contiguous()
    clients = torch.tensor([3, 7])
    mb.local_steps_(X, gamma=0.1, steps=1, clients=clients, mode="rr", batch_size=64, round=2)
    keys = randk_keys_tensor(client_seeds(0, clients), torch.full((2,), 2))
    for r, i in enumerate(clients.tolist()):
        m = int((mc.weights[i] > 0).sum())
        perm = permutation(m, keys[r])
        x = x0.clone()
        for B in torch.split(perm, 64):
            G = mb._grads(x[None], mc.inputs[i][B][None], mc.targets[i][B][None],
                          torch.full((1, B.numel()), 1.0 / B.numel()))  # fmt: skip
            x = x - 0.1 * G[0]
        torch.testing.assert_close(X[r], x, rtol=1e-5, atol=1e-6)
