"""
POLARIS: GRPO with an LLM-judge reward and human-reference injection, for long-form stories.

    python train.py config/tiny.py                                      # CPU, tiny model, local judge
    torchrun --standalone --nproc_per_node=2 train.py config/tiny.py      # the same on 2 gloo ranks
    torchrun --standalone --nproc_per_node=4 train.py config/polaris.py   # the paper run, 4x A100 80GB
    (several nodes, restarts and preemption: docs/scale.md)

Each step takes batch_groups prompts, each rank whole groups, and for each group:
1. Sample a group. group_size - n_ref stories for the prompt, all of a rank's in one batched
   decode (thinking on for the paper run); a story depends on (seed, step, group) alone.
2. Inject the reference. The human story joins the group (HRI), teacher-forced as the tokens the
   policy would emit: an empty thinking block (never trained: ref_mask_think, or a high advantage
   would teach the policy to stop thinking), the story, the end-of-turn token.
3. Judge. The LLM judge scores every story, reference too, thinking stripped, on the rubric:
   R = SQ - length_weight * (1 - length score). A story goes to the judge the step it ends.
4. Advantages. Over the group: (R - mean) / (std + eps); a failed judgement (NaN) gets 0.
5. Loss. On-policy, one update per batch: the gradient is -A grad log p at the sampling
   temperature, each sampled token weighted by min(pi_old / pi_sample, tis_cap) when a penalty,
   top-k or top-p reshape the sampler; token mean over every rank (loss_norm). Options: LUFFY's
   shaping of the reference's tokens, a KL term, batch reuse (num_iterations).
6. Update over ranks. Backward sends each gradient to the rank that owns its parameter (fp32 sums,
   optim.py); global-norm clipping; AdamW on the owners' fp32 masters; the owners broadcast.
Steps count from 1; every eval_interval steps an evaluation judge (eval_judge_*) scores held-out prompts.
"""
import collections
import dataclasses
import datetime
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import heldout
import judge as judge_lib
import preflight
import rollout
import configurator
from configurator import configure, redact_url
from optim import ShardedAdamW
from preflight import fail

# -----------------------------------------------------------------------------
# default config: the paper run's recipe (config/polaris.py sets every key, with the reasons, and its data)
# I/O
out_dir = "out/polaris"
save_interval = 20  # checkpoint every this many steps, and at the end
keep_last = 3  # checkpoints kept on disk
resume = False  # True: continue from the newest checkpoint; 'auto': that if there is one, else start
resume_from = ""  # a checkpoint folder to continue from, when the newest one is damaged
wandb_log, wandb_project, wandb_run_name = False, "polaris", "polaris-9b"
# data
train_data, max_ref_words = "data/sample/train.jsonl", 4000  # JSONL {id, prompt, target_words, story}
# model
init_from = "Qwen/Qwen3.5-9B"  # hub id or local folder; 'tiny' builds a tiny random model
tiny_vocab, tiny_hidden, tiny_layers = 1024, 64, 4  # only for init_from='tiny'
dtype, gradient_checkpointing = "bfloat16", True  # weights and gradients; AdamW keeps fp32 master weights
device_memory_gb = 0.0  # 0: read from the GPU (no check on CPU)
# grpo
max_steps, batch_groups = 160, 8  # batch_groups: prompts (groups) per step
group_size, n_ref = 6, 1  # stories per group, the human reference included; n_ref 0 turns HRI off
ref_reward, ref_mask_think = "judge", True  # 'judge' or a fixed reward such as '60'; its empty thinking untrained
ref_shaping_gamma = 0.0  # > 0: LUFFY's shaping of the reference's tokens, f(p) = p / (p + gamma); 0.1 in LUFFY
scale_rewards = "group"  # 'group': (R - mean) / (std + eps); 'none': R - mean
loss_norm = "token"  # 'token' (DAPO: every token alike), 'seq' (GRPO: every story alike), 'constant' (Dr. GRPO)
num_iterations = 1  # optimizer steps per batch; > 1 reuses it with PPO clipping
clip_low, clip_high = 0.2, 0.28  # the PPO ratio's clip range, 1 - clip_low to 1 + clip_high (TRL's epsilon, epsilon_high)
kl_coef = 0.0  # > 0: a KL term to the initial policy, a frozen copy of the model
learning_rate, warmup_steps, weight_decay, grad_clip = 1e-6, 10, 0.0, 1.0
beta1, beta2 = 0.9, 0.99
micro_batch_tokens = 9216  # tokens per forward/backward, padding counted: one 8k-token story, or several short
logprob_chunk = 1024  # rows of the LM head computed at once
piece_numel = 2 ** 26  # elements per fp32 piece in the optimizer and its collectives
tis_cap = 2.0  # truncated importance weight min(pi_old / pi_sample, tis_cap) for the sampler's mismatch; 0: off
seed = 1337
dist_timeout_s = 7200.0  # a collective waits this long for a dead or stuck rank (docs/scale.md says why 2 h)
lock_stale_s = 120.0  # out_dir's lock may be taken over after this long without its run's refresh
# rollout
enable_thinking, max_new_tokens = True, 8192
temperature, top_p, top_k = 0.6, 0.95, 20
repetition_penalty, presence_penalty = 1.0, 1.0
# judge
judge_url, judge_model = "https://generativelanguage.googleapis.com/v1beta/openai", "gemini-3-flash-preview"
judge_key_env = "GEMINI_API_KEY"  # the variable's name; the key is never logged or saved
judge_workers, judge_timeout, judge_backoff_max = 16, 300.0, 60.0  # threads per rank; seconds per request, per wait
judge_retries, judge_reasks = 6, 2  # on 429, 5xx, timeouts and bodies cut on the wire; on a reply that does not parse
judge_extra = {"reasoning_effort": "low"}  # passed through in the request body
judge_max_tokens, judge_max_reply_bytes = 8192, 1_000_000  # the reply's cap in tokens (0: none); larger bodies fail
judge_max_fail_frac = 0.5  # stop the run when more of a step's stories than this could not be scored
judge_price_in, judge_price_out = 0.50, 3.00  # dollars per million tokens
length_weight = 25.0  # reward = SQ - length_weight * (1 - length score)
# held-out evaluation (heldout.py): at step 0, every eval_interval steps (0: never) and the last
eval_interval, eval_data = 0, ""  # eval_data: JSONL rows like train_data's
# the evaluation judge: each None is the training judge's setting (eval_judge_url None: judge_url, ...)
eval_judge_url = eval_judge_model = eval_judge_key_env = None
eval_judge_workers = eval_judge_timeout = eval_judge_retries = eval_judge_reasks = eval_judge_backoff_max = None
eval_judge_extra = eval_judge_max_tokens = eval_judge_max_reply_bytes = eval_judge_price_in = eval_judge_price_out = None
# -----------------------------------------------------------------------------
config = configure(globals())
safe_config = {k: redact_url(v) if isinstance(v, str) else v for k, v in config.items()}  # no key from a URL is stored
plain_sampling = presence_penalty == 0 and repetition_penalty == 1 and top_k == 0 and top_p == 1  # the policy's own
ddp = int(os.environ.get("RANK", -1)) != -1  # torchrun sets RANK
ddp_rank = int(os.environ.get("RANK", 0))
ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
master_process = ddp_rank == 0
run = dict(stop=[], phase="starting", step=0, release=lambda: None,  # what SIGTERM or Ctrl-C interrupts
           again=configurator.command("train.py", drop=("resume", "resume_from"), add=["--resume=auto"]))
checkpoint.watch(run, ddp, dist_timeout_s)
stop = run["stop"]

# -----------------------------------------------------------------------------
# checks before any model work: the config, out_dir, the data (each bad row named), the judge
ref_fixed = preflight.check_config(config, ddp_world_size, judge_lib.RANGES)
ckpt = preflight.find_checkpoint(out_dir, resume, resume_from)  # the checkpoint this run continues, or None
rows, eval_rows, data_sha = preflight.load_data(config)  # before anything that waits on the network
try:
    judge = judge_lib.judge_from_config(config, cache_dir=os.path.join(out_dir, "judge_cache"))
    eval_judge = heldout.judge(config, cache_dir=os.path.join(out_dir, "judge_cache"))  # None: eval_interval 0
except (OSError, ValueError) as e:
    fail(str(e))
state, changed = preflight.check_resume(ckpt, config, data_sha, verbose=master_process) if ckpt else ({}, {})
import transformers  # noqa: E402
tok, model_config, model, longest = preflight.load_tokenizer(config, ckpt, rows, eval_rows)  # model: the tiny one

# -----------------------------------------------------------------------------
# ranks: about fifteen lines, no wrapper
if ddp:
    # CPU tensors (agreements) over gloo, GPU tensors over nccl; a collective raises after dist_timeout_s
    gpu = torch.cuda.is_available()
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if gpu else "gloo",
                            timeout=datetime.timedelta(seconds=dist_timeout_s))
    device = f"cuda:{ddp_local_rank}" if gpu else "cpu"
    if gpu:
        torch.cuda.set_device(device)
else:
    device = "cuda" if torch.cuda.is_available() else "cpu"
ptdtype = getattr(torch, dtype)
random.seed(seed + ddp_rank)
np.random.seed(seed + ddp_rank)
torch.manual_seed(seed + ddp_rank)
preflight.quiet(device)  # warnings that cannot apply, and progress bars that are not on a terminal

# -----------------------------------------------------------------------------
# the model: the memory plan from the config alone, one real judge call, then the weights.
# Checkpoints are written in the format of base_dir, the folder the run started from.
base_dir = checkpoint.base_folder(init_from, out_dir)
if init_from != "tiny" or ckpt:
    with torch.device("meta"):  # counted, not allocated
        model = checkpoint.policy(model_config)
preflight.check_memory(model, model_config, ddp_world_size, ptdtype.itemsize, verbose=master_process,
                       tokens=max(micro_batch_tokens, longest), logprob_chunk=logprob_chunk,
                       checkpointing=gradient_checkpointing, budget=device_memory_gb * 1e9 or (
                           torch.cuda.get_device_properties(device).total_memory if "cuda" in device else 0))
release_lock = preflight.take_lock(f"{out_dir}/run.lock", lock_stale_s) if master_process else lambda: None  # 1st write
run["release"] = release_lock
preflight.probe_judge(judge, rows, stop)
preflight.probe_judge(eval_judge, eval_rows, stop)
if init_from == "tiny" and not ckpt:
    if master_process:  # the tiny run's base model: its checkpoints' format, and evaluation's baseline
        checkpoint.save_tiny_base(model, tok, base_dir)
else:
    model = checkpoint.policy(model_config, ckpt or init_from, dtype=ptdtype)
model.to(device=device, dtype=ptdtype)
if gradient_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if ddp:
    dist.barrier()  # the tiny base is on disk before any rank reads it
kl_model = None
if kl_coef:  # a frozen copy of the initial policy, loaded only when the KL term is on
    kl_model = checkpoint.policy(transformers.AutoConfig.from_pretrained(base_dir), base_dir, dtype=ptdtype)
    kl_model.to(device=device, dtype=ptdtype).eval().requires_grad_(False)
eos = rollout.eos_ids(model, tok)
# AdamW sharded over the ranks, gradients summed in fp32 at each parameter's owner (optim.py)
opt = ShardedAdamW([p for p in model.parameters() if p.requires_grad], ddp_world_size, ddp_rank,
                   (beta1, beta2), weight_decay=weight_decay, piece_numel=piece_numel)
start_step = state.get("step", 0)
run["phase"] = "preparing out_dir"  # from here a signal waits for the first safe point: logs are being moved
if ckpt:  # the optimizer's fp32 state and the weights from it; the logs' rows after the checkpoint dropped
    if master_process:
        print(f"resuming from {ckpt} (step {start_step} of {max_steps})")
    checkpoint.restore(ckpt, start_step, opt, rank=ddp_rank, world=ddp_world_size, out_dir=out_dir)
if ddp:
    preflight.check_ranks(start_step, data_sha, ddp_world_size)
run_id = checkpoint.prepare(out_dir, state, safe_config, ddp_world_size, changed) if master_process else None  # kept across resumes
wandb_run = None
if wandb_log and master_process:  # the same wandb run continues on resume
    import wandb
    wandb_run = wandb.init(project=wandb_project, name=wandb_run_name, config=safe_config, id=run_id, resume="allow")

# -----------------------------------------------------------------------------
# the pieces of a step


def step_rows(step):
    """The step's batch_groups (group id, row): the run's k-th group takes row k of each epoch's permutation."""
    return [(k % batch_groups, rows[np.random.default_rng(seed + k // len(rows)).permutation(len(rows))[k % len(rows)]])
            for k in range((step - 1) * batch_groups, step * batch_groups)]


def micro_batch_loss(mb, old_logp, denom, padding):
    """Forward, loss and backward of one micro-batch; returns its sums for the metrics. The hooks
    of optim.py take each gradient to its owner rank; a padding pass adds zero gradient."""
    ids, attn, mask, sample_logp = (t.to(device) for t in rollout.collate(mb, tok.pad_token_id))
    logp, ent = rollout.token_logprobs(model, ids, attn, mask, temperature=temperature, chunk=logprob_chunk)  # (B, T-1)
    old_logp = logp.detach() if old_logp is None else old_logp
    adv = torch.tensor([s.adv for s in mb], device=device)  # (B,)
    is_ref = torch.tensor([s.is_ref for s in mb], device=device)  # (B,)
    weight, out = None, {}
    kl_logp = rollout.token_logprobs(kl_model, ids, attn, mask, temperature=temperature, chunk=logprob_chunk)[0] \
        if kl_coef else None
    if not plain_sampling:  # the sampler's mismatch: pi_old / pi_sample on sampled tokens, truncated at tis_cap
        sampled = mask.bool() & ~is_ref[:, None]
        ratio = torch.exp(old_logp - sample_logp).where(sampled, 1.0)
        out = dict(is_sum=ratio[sampled].sum().item(), is_tok=sampled.sum().item(),
                   is_clip=(ratio[sampled] > tis_cap).sum().item() if tis_cap else 0)
        weight = ratio.clamp(max=tis_cap) if tis_cap else None
    per_seq = rollout.grpo_loss(logp, old_logp, adv, mask, loss_norm=loss_norm, denom=denom, clip_low=clip_low,
                                clip_high=clip_high, kl_logp=kl_logp, kl_coef=kl_coef, is_ref=is_ref,
                                gamma=ref_shaping_gamma, is_weight=weight)
    if padding:
        (per_seq.sum() * 0.0).backward()  # the hooks' collectives, a zero gradient
        return {}
    per_seq.sum().backward()
    return dict(out, loss_on=per_seq[~is_ref].sum().item(), loss_off=per_seq[is_ref].sum().item(),
                train_tokens=attn.sum().item(), ref_nll=-(logp.detach() * mask)[is_ref].sum().item(),
                ref_tok=mask[is_ref].sum().item(), ent_sum=(ent * mask)[~is_ref].sum().item(),
                ent_tok=mask[~is_ref].sum().item())


def stop_run(done, where, why=None):
    """Every rank together: checkpoint the last completed step if it has none, say why the run
    stopped and the command that continues it, exit at once (a judge request in flight is not waited for)."""
    for j in filter(None, (judge, eval_judge)):
        j.cancel()
    if done > saved:
        save_checkpoint(done)
    if master_process:
        print(f"error: {where}: {why}" if why else f"error: stopped by {(stop or ['a signal to another rank'])[0]} {where}",
              file=sys.stderr)
        print((f"{out_dir}/ckpt_{done:06d} holds step {done}" if done else "no step was completed") + ". "
              + ("Once the judge works again, continue" if why else "Continue") + f" with:\n  {run['again']}",
              file=sys.stderr, flush=True)
    release_lock()
    os._exit(1)


def save_checkpoint(step):
    checkpoint.save(out_dir, step, model, opt, base_dir=base_dir, keep_last=keep_last, resumed=start_step, rank=ddp_rank,
                    world=ddp_world_size, state=dict(config=safe_config, world_size=ddp_world_size, data_sha256=data_sha,
                                                     run_id=run_id))


def evaluate(step):
    """The held-out prompts' stories after `step` updates, scored by the evaluation judge (heldout.py)."""
    run["phase"] = "evaluating the held-out prompts"
    return heldout.evaluate(model, tok, eval_rows, eval_judge, step, out_dir=out_dir, seed=seed, eos=eos,
                            max_new_tokens=max_new_tokens, enable_thinking=enable_thinking, rank=ddp_rank,
                            world=ddp_world_size, batch=batch_groups // ddp_world_size * (group_size - n_ref), stop=stop)


# -----------------------------------------------------------------------------
# the loop
ref_cache = {}  # row id -> its reference Story, built once
saved, t_ckpt = start_step, 0.0  # the newest checkpoint's step; seconds the last one took
if heldout.missing(out_dir, start_step, eval_interval, max_steps, eval_rows, rank=ddp_rank, world=ddp_world_size):
    held = evaluate(start_step)  # step 0's, or one that a stop signal cut short
    if held is None:
        stop_run(start_step, f"while evaluating step {start_step}")
    heldout.log(out_dir, start_step, max_steps, held, master=master_process, wandb=wandb_run)
for step in range(start_step + 1, max_steps + 1):  # steps count from 1: step k makes the policy of k updates
    t0 = time.time()
    my_rows = step_rows(step)[ddp_rank::ddp_world_size]  # rank r owns groups r, r + W, ...

    # 1. sample a group: all of this rank's in one batched decode; each story to the judge as it ends
    run.update(step=step, phase="generating")
    pending = []  # (story, the judge's future)
    model.eval()

    def to_judge(i, j, story):  # story j of this rank's group i has ended
        if not stop:
            pending.append((story, judge.submit(my_rows[i][1]["prompt"], my_rows[i][1]["target_words"], story.text)))
    bar = tqdm(total=max_new_tokens, desc=f"step {step}: decoding", unit="tok", leave=False,
               disable=not (master_process and sys.stderr.isatty()))
    groups = rollout.sample(
        model, tok, [rollout.render_prompt(tok, row["prompt"], enable_thinking) for _, row in my_rows],
        seeds=[seed + 100_003 * (step - 1) + gid for gid, _ in my_rows], n=group_size - n_ref, eos=eos,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty, enable_thinking=enable_thinking,
        on_done=to_judge, on_step=lambda: bar.update(1), should_stop=lambda: bool(stop))
    bar.close()
    acc = collections.Counter(t0=t0, t_generate=time.time() - t0, t_checkpoint=t_ckpt)

    # 2. inject the reference: the human story joins its group, last, teacher-forced
    for i, (_, row) in enumerate(my_rows if n_ref else []):
        if row["id"] not in ref_cache:
            ref_cache[row["id"]] = rollout.reference_story(tok, row, enable_thinking, eos, mask_think=ref_mask_think)
        ref = dataclasses.replace(ref_cache[row["id"]])  # this step's copy, for its judgement and advantage
        if ref_fixed is None:
            to_judge(i, None, ref)
        else:
            ref.judged = dict(judge_lib.blank(), sq=math.nan, ratio=1.0, reward=ref_fixed)
        groups[i].append(ref)

    # 3. judge: wait for every score; a judge that cannot score stops every rank before the update
    run["phase"], t1 = "waiting for the judge", time.time()
    stopping, why = judge_lib.judged(pending, stop, world=ddp_world_size, max_fail_frac=judge_max_fail_frac)  # all alike
    if stopping or why:
        stop_run(step - 1, f"step {step}" if why else f"in step {step} (abandoned before its update)", why=why)

    # 4. advantages: over each whole group, the reference included
    for group in groups:
        A, zero_std = rollout.group_advantages(torch.tensor([s.judged["reward"] for s in group], dtype=torch.float64),
                                               scale_rewards)
        for s, a in zip(group, A.tolist()):
            s.adv = a
        acc["zero_std"] += zero_std
    acc["t_judge_wait"] = time.time() - t1

    # 5. loss: micro-batches of about micro_batch_tokens tokens, the denominator counted over every rank
    run["phase"], t2 = "training", time.time()
    model.train()
    stories = [s for g in groups for s in g]
    counts = torch.tensor([sum(sum(s.mask) for s in stories), len(stories)], dtype=torch.float64)
    if ddp:
        dist.all_reduce(counts)
    denom = {"token": counts[0].item(), "seq": counts[1].item(), "constant": counts[1].item() * max_new_tokens}[loss_norm]
    micro = [[stories[i] for i in mb] for mb in rollout.micro_batches(
        [len(s.prompt_ids) + len(s.completion_ids) for s in stories], micro_batch_tokens)]
    # every rank runs as many backward passes (optim.py's hooks reduce in each one): a rank with
    # fewer micro-batches pads with passes over its shortest story that add zero gradient
    n_micro = torch.tensor([len(micro)])
    if ddp:
        dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)
    acc["idle"] = idle = n_micro.item() - len(micro)
    micro += [[min(stories, key=lambda s: len(s.prompt_ids) + len(s.completion_ids))]] * idle
    old_logps = [None] * len(micro)
    if num_iterations > 1:  # the batch is reused: the ratio needs the log-probs of the policy that sampled it
        with torch.no_grad():
            old_logps = [rollout.token_logprobs(model, *(t.to(device) for t in rollout.collate(mb, tok.pad_token_id)[:3]),
                                                temperature=temperature, chunk=logprob_chunk)[0] for mb in micro]
    acc["lr"] = lr = learning_rate * min(1.0, step / max(1, warmup_steps))  # linear warmup, then constant
    for it in range(num_iterations):  # steps 5 and 6 once, on-policy; num_iterations > 1 reuses the batch
        for k, mb in enumerate(micro):
            sums = micro_batch_loss(mb, old_logps[k], denom, padding=k >= len(micro) - idle)
            acc.update({key: v / num_iterations for key, v in sums.items() if key.startswith("loss_")})
            acc.update({key: v for key, v in sums.items() if it == 0 and not key.startswith("loss_")})

        # 6. update over ranks: the global gradient norm, clipping, the sharded AdamW
        t3 = time.time()
        acc["grad_norm"] = grad_norm = opt.grad_norm()
        if math.isfinite(grad_norm):
            opt.step(lr, min(1.0, grad_clip / (grad_norm + 1e-6)) if grad_clip else 1.0)  # torch's clip_grad_norm_ eps
        else:
            opt.zero_grad()
            acc["skipped"] += 1  # alike on every rank: the norm is of the gradients summed over ranks
        acc["t_sync"] += time.time() - t3
    acc["t_train"] = time.time() - t2 - acc["t_sync"]

    # after the update: the held-out evaluation when it is due (a stop signal cuts it; the next start redoes it)
    held = evaluate(step) if heldout.due(step, eval_interval, max_steps) else None
    run["phase"] = "writing the step's logs and checkpoint"
    _, stopping = checkpoint.log_step(out_dir, step, max_steps, groups, ids=[(gid, row) for gid, row in my_rows], acc=acc,
                                      held=held, stopping=len(stop), rank=ddp_rank, world=ddp_world_size, wandb=wandb_run)
    t_ckpt = time.time()  # logged with the next step
    if step % save_interval == 0 or step == max_steps:
        save_checkpoint(step)
        saved = step
    t_ckpt = time.time() - t_ckpt
    if stopping:
        stop_run(step, f"during step {step}, after its update")

for j in filter(None, (judge, eval_judge)):
    j.close()
if master_process:
    final = os.path.join(out_dir, f"ckpt_{max_steps:06d}")
    print(f"done: {max_steps} steps{heldout.summary(out_dir)}; the final checkpoint is {final}")
    print(checkpoint.next_commands(out_dir, final, base=base_dir if init_from == "tiny" else init_from,
                                   enable_thinking=enable_thinking, tiny=init_from == "tiny",
                                   max_new_tokens=max_new_tokens))
if ddp:
    dist.destroy_process_group()
