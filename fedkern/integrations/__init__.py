"""Integrations with training frameworks. Import the submodule you need; this package imports
nothing itself, so ``import fedkern`` never pulls in torch.distributed machinery or Flower.

- ``fedkern.integrations.ddp``: DDP communication hooks (top-k with EF14 / EF21, rand-k with
  shared-seed indices) and ``register(ddp_model, "topk_ef21", ratio=0.01)``.
- ``fedkern.integrations.flower``: a Flower strategy over fedkern's robust aggregators and a client
  mod that compresses updates (needs ``flwr``).
"""
