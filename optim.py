"""
train.py's optimizer: AdamW sharded over the ranks by hand, ZeRO-2 style, gradients summed in
fp32. The bf16 weights stay replicated; each parameter has one owner rank, which alone keeps its
fp32 gradient sum, fp32 master weight and moments, updates it and broadcasts the new weight.

    opt = ShardedAdamW(params, world_size, rank)   # registers a hook on every parameter
    loss.backward()               # per micro-batch: each gradient goes to its owner
    norm = opt.grad_norm()        # of the gradient summed over ranks and micro-batches
    opt.step(lr, clip_coef)       # AdamW on the owned shard, then the owners broadcast

Every rank must run as many backward passes: the hooks' collectives match one for one. Why fp32
sums, and what they cost per A100 at 9B: docs/code.md.
"""
import math

import torch
import torch.distributed as dist


class ShardedAdamW:

    def __init__(self, params, world_size=1, rank=0, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                 piece_numel=2 ** 26):
        self.params, self.world, self.rank = list(params), world_size, rank
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.piece_numel = piece_numel  # fp32 temporaries stay small, even for the embedding
        # each parameter to the least-loaded rank, largest first: shards of nearly equal size
        self.owner, load = [0] * len(self.params), [0] * world_size
        for i in sorted(range(len(self.params)), key=lambda i: -self.params[i].numel()):
            self.owner[i] = min(range(world_size), key=load.__getitem__)
            load[self.owner[i]] += self.params[i].numel()
        self.mine = [i for i in range(len(self.params)) if self.owner[i] == rank]
        self.master = {i: self.params[i].detach().float().clone() for i in self.mine}
        self.exp_avg = {i: torch.zeros_like(self.master[i]) for i in self.mine}
        self.exp_avg_sq = {i: torch.zeros_like(self.master[i]) for i in self.mine}
        self.grad = {i: torch.zeros_like(self.master[i]) for i in self.mine}  # fp32 gradient sums
        self.t = 0
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda p, i=i: self._reduce(i, p))

    def _pieces(self, t):
        return t.view(-1).split(self.piece_numel)

    def _reduce(self, i, p):
        """Autograd calls this as soon as p's gradient for the micro-batch is complete."""
        owned = self._pieces(self.grad[i]) if i in self.grad else None  # the owner's fp32 sum
        for k, g in enumerate(self._pieces(p.grad)):
            g = g.float()
            if self.world > 1:
                dist.reduce(g, dst=self.owner[i])  # summed over ranks, in fp32, at its owner
            if owned is not None:
                owned[k].add_(g)
        p.grad = None  # freed on every rank: only the owner's fp32 sum remains

    def grad_norm(self):
        sq = torch.zeros((), dtype=torch.float64, device=self.params[0].device)
        for i in self.mine:
            for g in self._pieces(self.grad[i]):
                sq += torch.linalg.vector_norm(g).double() ** 2
        if self.world > 1:
            dist.all_reduce(sq)  # each rank's sum of squares over its shard: one scalar
        return math.sqrt(sq.item())

    def step(self, lr, clip_coef=1.0):
        """AdamW on the owned parameters with the gradient scaled by clip_coef, then each owner
        broadcasts its new weights; the gradient sums are zeroed for the next batch."""
        self.t += 1
        b1, b2 = self.betas
        for i in self.mine:
            state = (self.grad[i], self.master[i], self.exp_avg[i], self.exp_avg_sq[i])
            for g, w, m, v, p in zip(*map(self._pieces, state + (self.params[i].data,))):
                g.mul_(clip_coef)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                rms = (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)  # of the bias-corrected v
                w.mul_(1 - lr * self.weight_decay).addcdiv_(m, rms, value=-lr / (1 - b1 ** self.t))
                p.copy_(w)
        self.zero_grad()
        self._broadcast()

    def _broadcast(self):
        if self.world > 1:  # one broadcast per tensor: simple, and small next to generation time
            for i, p in enumerate(self.params):
                dist.broadcast(p.data, src=self.owner[i])  # the owner's new weights to every rank

    def zero_grad(self):
        for g in self.grad.values():
            g.zero_()

    def state_dict(self):
        return dict(master=self.master, exp_avg=self.exp_avg, exp_avg_sq=self.exp_avg_sq,
                    adam_t=self.t)

    def load_state_dict(self, shards):
        """shards: every saving rank's state_dict(), whatever its world size: each rank takes
        what it owns now, and sets the weights from the fp32 masters (a checkpoint's are bf16)."""
        for name in ("master", "exp_avg", "exp_avg_sq"):
            setattr(self, name, {i: s[name][i].to(self.params[i].device, copy=True)
                                 for s in shards for i in self.mine if i in s[name]})
        if len(self.master) != len(self.mine):
            raise ValueError("the optimizer shards do not hold every trained parameter")
        self.t = shards[0]["adam_t"]
        for i in self.mine:
            self.params[i].data.copy_(self.master[i])
        self._broadcast()
