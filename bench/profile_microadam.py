"""Where a MicroAdam step's GPU time goes: per-kernel times of 5 steps on 1e8 bfloat16 parameters
in 4 tensors (torch.profiler). Run by bench/gpu_check.sh; needs a CUDA device."""

import torch

from fedkern.optim import MicroAdam


def main() -> None:
    sizes = (40_000_000, 30_000_000, 20_000_000, 10_000_000)
    ps = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=torch.bfloat16)) for n in sizes]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-2
    opt = MicroAdam(ps, lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            opt.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    print(table)


if __name__ == "__main__":
    main()
