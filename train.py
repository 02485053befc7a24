"""
POLARIS: GRPO with an LLM-judge reward and human-reference injection, for long-form stories.

    python train.py config/tiny.py                                     # CPU, tiny model
    torchrun --standalone --nproc_per_node=2 train.py config/tiny.py     # on 2 gloo ranks
    torchrun --standalone --nproc_per_node=4 train.py config/polaris.py  # the paper run: 4x A100
    python train.py config/tiny.py --help                               # every setting
    (several nodes, restarts and preemption: docs/scale.md)

Each step takes batch_groups prompts, each rank whole groups, and for each group:
1. Sample a group. group_size - n_ref stories for the prompt, all of a rank's in one batched
   decode (thinking on for the paper run); a story depends on (seed, step, group) alone.
2. Inject the reference. The human story joins the group (HRI), teacher-forced as the tokens the
   policy would emit: an empty thinking block (never trained: ref_mask_think, or a high advantage
   would teach the policy to stop thinking), the story, the end-of-turn token.
3. Judge. The LLM judge scores every story, reference too, thinking stripped, on the rubric:
   R = SQ - length_weight * (1 - length score). A story goes to the judge the step it ends. A
   failed judgement is NaN; a judge that cannot score stops every rank before the update.
4. Advantages. Over the group: (R - mean) / (std + eps); a failed judgement (NaN) gets 0.
5. Loss. On-policy, one update per batch: the gradient is -A grad log p at the sampling
   temperature, each sampled token weighted by min(pi_old / pi_sample, tis_cap) when a penalty,
   top-k or top-p reshape the sampler; the token mean over the whole batch, every rank's tokens
   counted. Every rank runs as many backward passes: the gradients travel inside them.
6. Update over ranks. Backward sends each gradient to the rank that owns its parameter (fp32
   sums, optim.py); global-norm clipping; AdamW on the owners' fp32 masters; they broadcast.
Steps count from 1; every eval_interval steps an evaluation judge scores held-out prompts.
Options neither config uses are lines tagged with their setting's name.
"""
import collections
import dataclasses
import datetime
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import configurator
import data
import heldout
import judge
import preflight
import rollout
import rundir
import tiny
from configurator import configure, redact_url
from optim import ShardedAdamW

# -----------------------------------------------------------------------------
# settings: the paper run's recipe (config/polaris.py gives each its reason)
# I/O
out_dir = "out/polaris"  # the run's folder: checkpoints, logs, run.json (rundir.py)
save_interval = 20  # checkpoint every this many steps, and at the end
keep_last = 3  # complete checkpoints kept on disk
resume = False  # True: from the newest checkpoint; 'auto': that if there is one, else start
resume_from = ""  # a checkpoint folder to continue from, when the newest one is damaged
wandb_log, wandb_project, wandb_run_name = False, "polaris", "polaris-9b"  # wandb, if wanted
# data
train_data = "data/sample/train.jsonl"  # JSONL {id, prompt, target_words, story}
max_ref_words = 4000  # a longer human story is refused by path:line
# model
init_from = "Qwen/Qwen3.5-9B"  # hub id or local folder; 'tiny' builds a tiny random model
tiny_vocab, tiny_hidden, tiny_layers = 1024, 64, 4  # init_from='tiny': its tokenizer, its size
dtype = "bfloat16"  # weights and gradients; AdamW keeps fp32 master weights
gradient_checkpointing = True  # layers recomputed in backward: an 8k-token story fits
device_memory_gb = 0.0  # 0: read from the GPU (no check on CPU)
# grpo
max_steps = 160
batch_groups = 8  # prompts (groups) per step, shared out among the ranks
group_size = 6  # stories per group, the human reference included
n_ref = 1  # human references per group: 1 is HRI, 0 turns it off (no other value)
ref_reward = "judge"  # 'judge', or a fixed reward of the references such as '60'
ref_mask_think = True  # the reference's empty thinking block is not trained
learning_rate = 1e-6
warmup_steps = 10  # linear warmup, then constant
weight_decay = 0.0
grad_clip = 1.0  # the global gradient norm's cap (0: none)
beta1, beta2 = 0.9, 0.99
micro_batch_tokens = 9216  # tokens per forward/backward, padding counted
logprob_chunk = 1024  # rows of the LM head computed at once
piece_numel = 2 ** 26  # elements per fp32 piece in the optimizer and its collectives
tis_cap = 2.0  # the truncated importance weight's cap (the sampler's mismatch); 0: off
seed = 1337
dist_timeout_s = 7200.0  # a collective waits this long for a dead or stuck rank (docs/scale.md)
lock_stale_s = 120.0  # out_dir's lock may be taken over after this long unrefreshed
# options neither config uses: each is a few lines tagged with its name
scale_rewards = "group"  # 'group': (R - mean) / (std + eps); 'none': R - mean (Dr. GRPO)
loss_norm = "token"  # 'token': tokens alike (DAPO); 'seq': stories alike (GRPO); 'constant'
num_iterations = 1  # optimizer steps per batch; > 1 reuses it with PPO clipping
clip_low, clip_high = 0.2, 0.28  # num_iterations > 1: the ratio clipped to 1 -+ them (TRL's)
kl_coef = 0.0  # > 0: a KL term to the initial policy, a frozen copy of the model
ref_shaping_gamma = 0.0  # > 0: LUFFY's f(p) = p / (p + gamma) on the references' tokens
# rollout
enable_thinking = True
max_new_tokens = 8192
temperature = 0.6  # the log-probs are taken at the same temperature
top_p = 0.95
top_k = 20
repetition_penalty = 1.0
presence_penalty = 1.0  # never with repetition_penalty (the card)
# judge
judge_url = "https://generativelanguage.googleapis.com/v1beta/openai"  # the API's base URL
judge_model = "gemini-3-flash-preview"
judge_key_env = "GEMINI_API_KEY"  # the variable's name; the key is never logged or saved
judge_workers = 16  # requests in flight per rank
judge_timeout = 300.0  # seconds for one request: connecting, headers and body
judge_retries = 6  # on 429, 5xx, timeouts and bodies cut on the wire
judge_reasks = 2  # on a reply that does not parse
judge_backoff_max = 60.0  # the longest wait between retries
judge_extra = {"reasoning_effort": "low"}  # passed through in the request body
judge_max_tokens = 8192  # the reply's cap in tokens (0: none)
judge_max_reply_bytes = 1_000_000  # a larger reply body is a failure
judge_max_fail_frac = 0.5  # more of a step's stories unscored than this stops the run
judge_price_in = 0.50  # dollars per million tokens in
judge_price_out = 3.00  # dollars per million tokens out
length_weight = 25.0  # reward = SQ - length_weight * (1 - length score)
# held-out evaluation (heldout.py): at step 0, every eval_interval steps (0: never) and the last
eval_interval = 0
eval_data = ""  # JSONL rows like train_data's, none of them in it
# the evaluation judge: each None is the training judge's setting (eval_judge_url: judge_url)
eval_judge_url = eval_judge_model = eval_judge_key_env = None
eval_judge_workers = eval_judge_timeout = eval_judge_retries = eval_judge_reasks = None
eval_judge_backoff_max = eval_judge_extra = eval_judge_max_tokens = None
eval_judge_max_reply_bytes = eval_judge_price_in = eval_judge_price_out = None
# -----------------------------------------------------------------------------
config = configure(globals())
safe_config = {k: redact_url(v) if isinstance(v, str) else v for k, v in config.items()}  # no keys
plain_sampling = presence_penalty == 0 and repetition_penalty == 1 and top_k == 0 and top_p == 1
ddp = int(os.environ.get("RANK", -1)) != -1  # torchrun sets RANK
ddp_rank = int(os.environ.get("RANK", 0))
ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
master_process = ddp_rank == 0

# -----------------------------------------------------------------------------
# stopping: a signal (preemption, Ctrl-C) stops at the loop's next safe point; an error is one line
signals = []  # the names of the signals this rank received
again = configurator.command("train.py", drop=("resume", "resume_from"), add=["--resume=auto"])
run = dict(phase="starting", step=0, release=lambda: None)  # what a signal interrupts; the lock


def on_signal(signum, frame):
    """While starting nothing is written yet: end at once. Later: stop at the next safe point,
    which checkpoints the last completed step; a second signal exits at once."""
    name = signal.Signals(signum).name
    if run["phase"] == "starting":
        print(f"\nerror: stopped by {name} while starting, before any step. Start it again with:\n"
              f"  {again}", file=sys.stderr, flush=True)
        run["release"]()
        os._exit(1)
    if signals:
        os._exit(128 + signum)  # a checkpoint being written stays a .tmp_ folder
    signals.append(name)
    print(f"\n{name} while {run['phase']}: stopping at the next safe point; a second signal exits "
          "at once", file=sys.stderr, flush=True)


def on_error(kind, e, tb):
    """Library code raises; the run says it in one line. A ValueError or OSError names the setting,
    file or step; a failed collective, that a rank died or hung. Anything else is a bug."""
    lost = ("gloo", "NCCL", "Connection", "imed out")  # what torch says of a collective it lost
    if issubclass(kind, (ValueError, OSError)):
        print(f"error: {redact_url(e)}", file=sys.stderr, flush=True)
    elif ddp and issubclass(kind, RuntimeError) and any(w in str(e) for w in lost):
        where, first = f"step {run['step']}" if run["step"] else "start-up", str(e).splitlines()[0]
        print(f"error: {where}: a collective with the other ranks failed: {first[:300]}. A rank "
              f"died, or waited dist_timeout_s={dist_timeout_s:g} for a stuck one; the newest "
              "checkpoint continues the run (--resume=auto)", file=sys.stderr, flush=True)
    else:
        sys.__excepthook__(kind, e, tb)  # a bug: its traceback


sys.excepthook = on_error
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)

# -----------------------------------------------------------------------------
# checks before any model work, those that cost nothing first (each raises, naming what to fix)
ref_fixed = preflight.check_config(config, ddp_world_size, judge.RANGES)  # None: judged
ckpt = checkpoint.find(out_dir, resume, resume_from)  # the checkpoint this run continues, or None
rows, eval_rows, data_sha = data.load(train_data, max_ref_words, eval_data if eval_interval else "")
judge_client = judge.from_config(config, cache_dir=f"{out_dir}/judge_cache")
eval_client = heldout.client(config, cache_dir=f"{out_dir}/judge_cache")  # None: eval_interval 0
state, changed = checkpoint.check_resume(ckpt, config, data_sha) if ckpt else ({}, {})
if changed and master_process:
    print("changed on resume: " + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
tiny_base = init_from == "tiny" and not ckpt  # a new tiny run: random weights, its own tokenizer
if tiny_base:
    tok = tiny.tokenizer([train_data], tiny_vocab)  # learned from the data
    model_config = tiny.config(tok, tiny_hidden, tiny_layers)
    model = tiny.model(model_config, seed)  # the run's base model
else:  # from the hub, a folder or the checkpoint
    tok, model_config = checkpoint.tokenizer_and_config(ckpt or init_from)
longest = data.check_tokens(tok, model_config, rows, eval_rows, paths=(train_data, eval_data),
                            max_new_tokens=max_new_tokens, max_ref_words=max_ref_words,
                            with_ref=n_ref > 0, thinking=enable_thinking)  # the longest sequence

# -----------------------------------------------------------------------------
# ranks: about fifteen lines, no wrapper
if ddp:
    # CPU tensors (agreements) over gloo, GPU ones over nccl; each waits dist_timeout_s at most
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
checkpoint.quiet(device)  # warnings that cannot apply, and progress bars off a terminal

# -----------------------------------------------------------------------------
# the model: its memory plan from a skeleton, one real judge call, then the weights.
# Checkpoints are written in the format of base_dir, the folder the run started from.
base_dir = checkpoint.base_folder(init_from, out_dir)
if not tiny_base:
    with torch.device("meta"):  # counted, not allocated
        model = checkpoint.policy(model_config)
gpu_bytes = torch.cuda.get_device_properties(device).total_memory if "cuda" in device else 0
preflight.check_memory(model, model_config, ddp_world_size, ptdtype.itemsize,
                       tokens=max(micro_batch_tokens, longest), logprob_chunk=logprob_chunk,
                       checkpointing=gradient_checkpointing, verbose=master_process,
                       budget=device_memory_gb * 1e9 or gpu_bytes)
release_lock = lambda: None  # noqa: E731 -- the master's lock is the run's first write
if master_process:
    release_lock = run["release"] = rundir.take_lock(f"{out_dir}/run.lock", lock_stale_s)
preflight.probe_judge(judge_client, rows)
preflight.probe_judge(eval_client, eval_rows)
if tiny_base:
    if master_process:  # the tiny run's base model: its checkpoints' format, evaluation's baseline
        checkpoint.save_tiny_base(model, tok, base_dir)
else:
    model = checkpoint.policy(model_config, ckpt or init_from, dtype=ptdtype)
model.to(device=device, dtype=ptdtype)
if gradient_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if ddp:
    dist.barrier()  # the tiny base is on disk before any rank reads it
kl_model = checkpoint.frozen_copy(base_dir, device, ptdtype) if kl_coef else None  # kl_coef
eos = rollout.eos_ids(model, tok)
# AdamW sharded over the ranks, gradients summed in fp32 at each parameter's owner (optim.py)
opt = ShardedAdamW([p for p in model.parameters() if p.requires_grad], ddp_world_size, ddp_rank,
                   (beta1, beta2), weight_decay=weight_decay, piece_numel=piece_numel)
start_step = state.get("step", 0)
run["phase"] = "preparing out_dir"  # from here a signal waits for a safe point: logs are moving
if ckpt:  # the optimizer's fp32 state and the weights from it; the rows after it dropped
    if master_process:
        print(f"resuming from {ckpt} (step {start_step} of {max_steps})")
        rundir.trim_logs(out_dir, start_step, later=checkpoint.later_than(out_dir, start_step))
    checkpoint.restore(ckpt, opt, rank=ddp_rank, world=ddp_world_size)
if ddp:  # every node must see one shared out_dir and the same training data
    views = [None] * ddp_world_size
    dist.all_gather_object(views, (start_step, data_sha))
    preflight.check_ranks(views)
run_id = None
if master_process:
    run_id = rundir.prepare(out_dir, state, safe_config, ddp_world_size, changed)
wandb_run = None
if wandb_log and master_process:  # the same wandb run continues on resume
    import wandb
    wandb_run = wandb.init(project=wandb_project, name=wandb_run_name, config=safe_config,
                           id=run_id, resume="allow")

# -----------------------------------------------------------------------------
# the pieces of a step


def step_rows(step):
    """The step's batch_groups (group id, row): the run's k-th group takes row k of each epoch's
    permutation."""
    order = lambda epoch: np.random.default_rng(seed + epoch).permutation(len(rows))  # noqa: E731
    return [(k % batch_groups, rows[order(k // len(rows))[k % len(rows)]])
            for k in range((step - 1) * batch_groups, step * batch_groups)]


def micro_batch_loss(mb, old_logp, normaliser, padding):
    """Forward, loss and backward of one micro-batch. The hooks of optim.py take each gradient to
    its owner rank; a padding pass adds zero gradient. Returns its sums for the metrics, and the
    log-probs it took as pi_old (a reused batch, num_iterations > 1, keeps them for the next)."""
    ids, attn, mask, sample_logp = (t.to(device) for t in rollout.collate(mb, tok.pad_token_id))
    logp, ent = rollout.token_logprobs(model, ids, attn, mask, temperature=temperature,
                                       chunk=logprob_chunk)  # (B, T-1)
    old_logp = logp.detach() if old_logp is None else old_logp  # on-policy: pi_old is pi
    adv = torch.tensor([s.adv for s in mb], device=device)  # (B,)
    is_ref = torch.tensor([s.is_ref for s in mb], device=device)  # (B,)
    is_weight, stats = None, {}
    if not plain_sampling:  # the sampler's mismatch: pi_old / pi_sample on sampled tokens, capped
        sampled = mask.bool() & ~is_ref[:, None]
        sampler_ratio = torch.exp(old_logp - sample_logp).where(sampled, 1.0)  # (B, T-1)
        stats = dict(is_sum=sampler_ratio[sampled].sum().item(), is_tok=sampled.sum().item(),
                     is_clip=(sampler_ratio[sampled] > tis_cap).sum().item() if tis_cap else 0)
        is_weight = sampler_ratio.clamp(max=tis_cap) if tis_cap else None
    kl_logp = None
    if kl_coef:  # kl_coef: the initial policy's log-probs
        kl_logp = rollout.token_logprobs(kl_model, ids, attn, mask, temperature=temperature,
                                         chunk=logprob_chunk)[0]  # kl_coef
    per_seq = rollout.grpo_loss(logp, old_logp, adv, mask, normaliser, is_weight=is_weight,
                                loss_norm=loss_norm, is_ref=is_ref, gamma=ref_shaping_gamma,
                                clip=(clip_low, clip_high) if num_iterations > 1 else None,
                                kl_logp=kl_logp, kl_coef=kl_coef)
    if padding:
        (per_seq.sum() * 0.0).backward()  # the hooks' collectives, a zero gradient
        return {}, old_logp
    per_seq.sum().backward()
    stats.update(loss_on=per_seq[~is_ref].sum().item(), loss_off=per_seq[is_ref].sum().item(),
                 train_tokens=attn.sum().item(), ref_tok=mask[is_ref].sum().item(),
                 ref_nll=-(logp.detach() * mask)[is_ref].sum().item(),
                 ent_sum=(ent * mask)[~is_ref].sum().item(), ent_tok=mask[~is_ref].sum().item())
    return stats, old_logp


def stop_run(done, where, why=None):
    """Every rank together: checkpoint the last completed step if it has none, say why the run
    stopped and the command that continues it, exit at once (no judge request is waited for)."""
    for client in filter(None, (judge_client, eval_client)):
        client.cancel()
    if done > saved:
        save_checkpoint(done)
    if master_process:
        cause = why or f"stopped by {(signals or ['a signal to another rank'])[0]} {where}"
        print(f"error: {where}: {why}" if why else f"error: {cause}", file=sys.stderr)
        held = f"{out_dir}/ckpt_{done:06d} holds step {done}" if done else "no step was completed"
        print(f"{held}. " + ("Once the judge works again, continue" if why else "Continue")
              + f" with:\n  {again}", file=sys.stderr, flush=True)
    release_lock()
    os._exit(1)


def save_checkpoint(step):
    state = dict(config=safe_config, world_size=ddp_world_size, data_sha256=data_sha, run_id=run_id)
    checkpoint.save(out_dir, step, model, opt, base_dir=base_dir, state=state, keep_last=keep_last,
                    resumed=start_step, rank=ddp_rank, world=ddp_world_size)


def evaluate(step):
    """The held-out prompts' stories after `step` updates, scored by the evaluation judge."""
    run["phase"] = "evaluating the held-out prompts"
    return heldout.evaluate(model, tok, eval_rows, eval_client, step, out_dir=out_dir, seed=seed,
                            eos=eos, max_new_tokens=max_new_tokens, thinking=enable_thinking,
                            batch=batch_groups // ddp_world_size * (group_size - n_ref),
                            rank=ddp_rank, world=ddp_world_size, signals=signals)


# -----------------------------------------------------------------------------
# the loop
ref_cache = {}  # row id -> its reference Story, built once
saved, t_ckpt = start_step, 0.0  # the newest checkpoint's step; seconds the last one took
due = heldout.missing(out_dir, start_step, eval_interval, max_steps, eval_rows, ddp_rank,
                      ddp_world_size)
if due:  # step 0's evaluation, or one that a stop signal cut short
    held = evaluate(start_step)
    if held is None:
        stop_run(start_step, f"while evaluating step {start_step}")
    if master_process:
        rundir.log_heldout(out_dir, start_step, max_steps, held, wandb=wandb_run)
for step in range(start_step + 1, max_steps + 1):  # step k makes the policy of k updates
    t0 = time.time()
    my_rows = step_rows(step)[ddp_rank::ddp_world_size]  # rank r owns groups r, r + W, ...

    # 1. sample a group: all of this rank's in one batched decode; each story judged as it ends
    run.update(step=step, phase="generating")
    pending = []  # (story, the judge's future)
    model.eval()

    def to_judge(i, j, story):  # story j of this rank's group i has ended
        if not signals:
            row = my_rows[i][1]
            future = judge_client.submit(row["prompt"], row["target_words"], story.text)
            pending.append((story, future))
    bar = tqdm(total=max_new_tokens, desc=f"step {step}: decoding", unit="tok", leave=False,
               disable=not (master_process and sys.stderr.isatty()))
    prompts = [rollout.render_prompt(tok, row["prompt"], enable_thinking) for _, row in my_rows]
    groups = rollout.sample(
        model, tok, prompts,
        seeds=[seed + 100_003 * (step - 1) + gid for gid, _ in my_rows], n=group_size - n_ref,
        eos=eos, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        enable_thinking=enable_thinking, on_story=to_judge, on_step=lambda: bar.update(1),
        should_stop=lambda: bool(signals))
    bar.close()
    tally = collections.Counter(t0=t0, t_generate=time.time() - t0, t_checkpoint=t_ckpt)

    # 2. inject the reference: the human story joins its group, last, teacher-forced
    for i, (_, row) in enumerate(my_rows if n_ref else []):
        if row["id"] not in ref_cache:
            ref_cache[row["id"]] = rollout.reference_story(tok, row, enable_thinking, eos,
                                                           mask_think=ref_mask_think)
        ref = dataclasses.replace(ref_cache[row["id"]])  # this step's copy, for its judgement
        if ref_fixed is None:
            to_judge(i, None, ref)
        else:
            ref.judgement = dict(judge.blank(), sq=math.nan, ratio=1.0, reward=ref_fixed)
        groups[i].append(ref)

    # 3. judge: wait for every score; the ranks vote, and a judge that cannot score stops them all
    run["phase"], t1 = "waiting for the judge", time.time()
    if judge.wait([f for _, f in pending], signals):
        for story, future in pending:
            story.judgement = future.result()
    vote = dict(judge.health([] if signals else [s for s, _ in pending]), signals=len(signals))
    votes = [vote]  # this rank's: stories asked, failures no retry fixes, other failures, signals
    if ddp:
        votes = [None] * ddp_world_size
        dist.all_gather_object(votes, vote)  # every rank learns every rank's vote
    halt = any(v["signals"] for v in votes)  # a signal on any rank stops every rank
    why = None if halt else judge.stop_reason(votes, judge_max_fail_frac)
    if halt or why:
        where = f"step {step}" if why else f"in step {step} (abandoned before its update)"
        stop_run(step - 1, where, why=why)

    # 4. advantages: over each whole group, the reference included
    for group in groups:
        R = torch.tensor([s.judgement["reward"] for s in group], dtype=torch.float64)  # (G,)
        A, zero_std = rollout.group_advantages(R, scale_rewards)
        for s, a in zip(group, A.tolist()):
            s.adv = a
        tally["zero_std"] += zero_std
    tally["t_judge_wait"] = time.time() - t1

    # 5. loss: micro-batches of about micro_batch_tokens tokens; the token mean counted over ranks
    run["phase"], t2 = "training", time.time()
    model.train()
    stories = [s for g in groups for s in g]
    counts = torch.tensor([sum(sum(s.mask) for s in stories), len(stories)], dtype=torch.float64)
    if ddp:
        dist.all_reduce(counts)  # trained tokens and stories of the whole batch, every rank's
    normaliser = counts[0].item()  # every token alike, whichever rank (a failed story's too: A = 0)
    if loss_norm != "token":  # loss_norm: 'seq' per story, 'constant' per story x max_new_tokens
        per_story = max_new_tokens if loss_norm == "constant" else 1  # loss_norm
        normaliser = counts[1].item() * per_story  # loss_norm
    length = lambda s: len(s.prompt_ids) + len(s.completion_ids)  # noqa: E731
    micro = [[stories[i] for i in mb]
             for mb in rollout.micro_batches([length(s) for s in stories], micro_batch_tokens)]
    # every rank runs as many backward passes (optim.py's hooks reduce in each one): a rank with
    # fewer micro-batches pads with passes over its shortest story that add zero gradient
    n_micro = torch.tensor([len(micro)])
    if ddp:
        dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)
    n_real = len(micro)
    tally["idle"] = idle = n_micro.item() - n_real
    micro += [[min(stories, key=length)]] * idle
    old_logps = [None] * len(micro)  # pi_old: the policy itself, until an update (num_iterations)
    tally["lr"] = lr = learning_rate * min(1.0, step / max(1, warmup_steps))  # warmup, then flat
    for it in range(num_iterations):  # steps 5 and 6 once, on-policy; num_iterations > 1: again
        for k, mb in enumerate(micro):
            mb_stats, old_logps[k] = micro_batch_loss(mb, old_logps[k], normaliser,
                                                      padding=k >= n_real)
            # the loss's parts averaged over the iterations; the other sums from the first
            tally.update({key: v / num_iterations for key, v in mb_stats.items() if "loss_" in key})
            tally.update({key: v for key, v in mb_stats.items() if it == 0 and "loss_" not in key})

        # 6. update over ranks: the global gradient norm, clipping, the sharded AdamW
        t3 = time.time()
        tally["grad_norm"] = grad_norm = opt.grad_norm()
        if math.isfinite(grad_norm):
            clip_coef = min(1.0, grad_clip / (grad_norm + 1e-6)) if grad_clip else 1.0  # as torch
            opt.step(lr, clip_coef)
        else:
            opt.zero_grad()
            tally["skipped"] += 1  # on every rank alike: the norm is of the sum over ranks
        tally["t_sync"] += time.time() - t3
    tally["t_train"] = time.time() - t2 - tally["t_sync"]

    # after the update: the held-out evaluation when it is due (a signal cuts it: redone at start)
    held = evaluate(step) if heldout.due(step, eval_interval, max_steps) else None
    run["phase"] = "writing the step's logs and checkpoint"
    means, totals = rundir.step_sums(groups, tally, signals)  # this rank's [sum, count]s and sums
    pairs_t = torch.tensor(list(means.values()), dtype=torch.float64)  # (M, 2)
    sums_t = torch.tensor(list(totals.values()), dtype=torch.float64)  # (S,), the stop vote too
    mine = rundir.story_rows(step, my_rows, groups)  # rows of rollouts.jsonl, and the references
    parts = [mine]
    if ddp:
        dist.all_reduce(pairs_t)  # the step's metrics over every rank
        dist.all_reduce(sums_t)  # ... and the stop agreement: a signal on any rank stops all
        parts = [None] * ddp_world_size if master_process else None
        dist.gather_object(mine, parts, dst=0)  # every story to the master, who writes
    m, halt = rundir.step_metrics(step, dict(zip(means, pairs_t.tolist())),
                                  dict(zip(totals, sums_t.tolist())), tally, world=ddp_world_size,
                                  has_refs=n_ref > 0)
    if master_process:
        rundir.log_step(out_dir, dict(m, **(held or {})), records=[r for p in parts for r in p[0]],
                        references=[r for p in parts for r in p[1]], max_steps=max_steps,
                        wandb=wandb_run)
    t_ckpt = time.time()  # logged with the next step
    if step % save_interval == 0 or step == max_steps:
        save_checkpoint(step)
        saved = step
    t_ckpt = time.time() - t_ckpt
    if halt:
        stop_run(step, f"during step {step}, after its update")

for client in filter(None, (judge_client, eval_client)):
    client.close()
if master_process:
    base = base_dir if init_from == "tiny" else init_from
    print(rundir.closing_lines(out_dir, max_steps, base=base, thinking=enable_thinking,
                               tiny=init_from == "tiny", max_new_tokens=max_new_tokens))
if ddp:
    dist.destroy_process_group()
