"""optim.ShardedAdamW: 2 gloo ranks and 1 process compute the same update, bit for bit, on
gradients that sum exactly (multiples of 1/8), so any difference is the sharding's."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from optim import ShardedAdamW

SHAPES = [(7, 5), (5,), (3, 4, 2), (1,)]


def coefs(rank):
    """Fixed per-rank gradients: loss = sum(c * p) has gradient exactly c."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(-16, 17, s, generator=g).float() / 8 for s in SHAPES]


def params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]


def run(world, rank, micro_batches, steps=3):
    ps = params()
    opt = ShardedAdamW(ps, world, rank, weight_decay=0.1, piece_numel=8)  # pieces smaller than the tensors
    norms = []
    for _ in range(steps):
        for mb in micro_batches:  # each rank backwards its own micro-batches, the hooks sum them at owners
            sum((c * p).sum() for c, p in zip(coefs(mb), ps)).backward()
            assert all(p.grad is None for p in ps), "every rank frees the gradient once its owner has it"
        norms.append(opt.grad_norm())
        opt.step(1e-2, clip_coef=0.5)
    return [p.detach().clone() for p in ps], norms


def worker(rank, port, q):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ps, norms = run(2, rank, micro_batches=[rank, rank + 2])
    q.put((rank, ([p.numpy() for p in ps], norms)))  # numpy arrays travel by value, not as shared memory
    dist.destroy_process_group()


def test_two_gloo_ranks_update_exactly_like_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    one, norms = run(1, 0, micro_batches=[0, 2, 1, 3])
    summed = [a + b + d + e for a, b, d, e in zip(*map(coefs, range(4)))]  # exact: multiples of 1/8
    expect = sum(c.double().pow(2).sum() for c in summed).sqrt().item()
    assert abs(norms[0] - expect) < 1e-6 * expect, f"the norm of the exactly summed gradients: {norms[0]} vs {expect}"
    for rank, (ps, ns) in out.items():
        # the same fp32 shard norms added in float64 in another order
        assert all(abs(a - b) < 1e-12 * b for a, b in zip(ns, norms)), f"rank {rank}: gradient norms {ns} vs {norms}"
        for a, b in zip(map(torch.from_numpy, ps), one):
            assert torch.equal(a, b), f"rank {rank}: parameters differ from 1 process by {(a - b).abs().max():.2e}"
    assert not torch.equal(one[0], params()[0]), "the steps moved the parameters"
