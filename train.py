"""
POLARIS: GRPO with an LLM-judge reward and human-reference injection, for long-form stories.

    python train.py config/tiny.py                                      # CPU, tiny model, local judge
    torchrun --standalone --nproc_per_node=2 train.py config/tiny.py      # the same on 2 gloo ranks
    torchrun --standalone --nproc_per_node=4 train.py config/polaris.py   # the paper run, 4x A100 80GB
    (several nodes, restarts and preemption: docs/scale.md)

Each step takes batch_groups prompts; each rank owns whole groups. For each group:
1. Sample a group. The policy writes group_size - n_ref stories for the prompt, every group of
   the rank in one batched decode (thinking on for the paper run); a story depends on (seed,
   step, group) alone, so 1 or 4 ranks write the same stories.
2. Inject the reference. The human story for the prompt joins the group (HRI), teacher-forced as
   the tokens the policy would emit: an empty thinking block (never trained: ref_mask_think, or a
   high advantage would teach the policy to stop thinking), the story, the end-of-turn token.
3. Judge. Every story, the reference too, is scored by the LLM judge on the 16-dimension rubric,
   thinking stripped: R = SQ - length_weight * (1 - length score). A story goes to the judge the
   step it ends. The run stops when the judge fails for good, or for too many stories.
4. Advantages. Over the whole group: (R - mean) / (std + eps), or R - mean (scale_rewards='none');
   a failed judgement (NaN) is left out and gets 0.
5. Loss. On-policy, one update per batch: the PPO ratio is 1 and the gradient -A grad log p at the
   sampling temperature, each sampled token weighted by min(pi_old / pi_sample, tis_cap) when a
   penalty, top-k or top-p reshape the sampler. Token mean over every rank (loss_norm='token';
   'seq' is GRPO's, 'constant' Dr. GRPO's). Options: LUFFY's shaping of the reference's tokens
   (ref_shaping_gamma), a KL term to the initial policy (kl_coef), batch reuse (num_iterations).
6. Update over ranks. Backward sends each gradient to the rank that owns its parameter, summed in
   fp32 (optim.py); global-norm clipping; each owner's AdamW on fp32 masters; owners broadcast.
"""
import collections
import concurrent.futures
import dataclasses
import datetime
import glob
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import judge as judge_lib
import preflight
import rollout
import rubric
import tiny
from configurator import configure, redact_url
from optim import ShardedAdamW
from preflight import fail

# -----------------------------------------------------------------------------
# default config: the paper run (config/polaris.py repeats it with the reasons)
# I/O
out_dir = "out/polaris"
save_interval = 20  # checkpoint every this many steps, and at the end
keep_last = 3  # checkpoints kept on disk
resume = False  # True: continue from the newest checkpoint; 'auto': that if there is one, else start
resume_from = ""  # a checkpoint folder to continue from, when the newest one is damaged
wandb_log = False
wandb_project = "polaris"
wandb_run_name = "polaris-9b"
# data
train_data = "data/sample/train.jsonl"  # JSONL {id, prompt, target_words, story}
max_ref_words = 4000
# model
init_from = "Qwen/Qwen3.5-9B"  # hub id or local folder; 'tiny' builds a tiny random model
tiny_vocab, tiny_hidden, tiny_layers = 1024, 64, 4  # only for init_from='tiny'
dtype = "bfloat16"  # weights and gradients; AdamW keeps fp32 master weights
gradient_checkpointing = True
device_memory_gb = 0.0  # 0: read from the GPU (no check on CPU)
# grpo
max_steps = 160
batch_groups = 8  # prompts (groups) per step
group_size = 6  # stories per group, the human reference included
n_ref = 1  # human references per group; 0 turns HRI off
ref_reward = "judge"  # 'judge', or a fixed reward for the reference such as '60'
ref_mask_think = True
ref_shaping_gamma = 0.0  # > 0: LUFFY's shaping of the reference's tokens, f(p) = p / (p + gamma); 0.1 in LUFFY
scale_rewards = "group"  # 'group': (R - mean) / (std + eps); 'none': R - mean
loss_norm = "token"  # 'token' (DAPO: every token alike), 'seq' (GRPO: every story alike), 'constant' (Dr. GRPO)
num_iterations = 1  # optimizer steps per batch; > 1 reuses it with PPO clipping
clip_low, clip_high = 0.2, 0.28  # the PPO ratio's clip range, 1 - clip_low to 1 + clip_high (TRL's epsilon, epsilon_high)
kl_coef = 0.0  # > 0: a KL term to the initial policy, a frozen copy of the model
learning_rate = 1e-6
warmup_steps = 10
weight_decay = 0.0
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
micro_batch_tokens = 9216  # tokens per forward/backward, padding counted: one 8k-token story, or several short
logprob_chunk = 1024  # rows of the LM head computed at once
piece_numel = 2 ** 26  # elements per fp32 piece in the optimizer and its collectives
tis_cap = 2.0  # truncated importance weight min(pi_old / pi_sample, tis_cap) for the sampler's mismatch; 0: off
seed = 1337
dist_timeout_s = 7200.0  # a collective waits this long for a dead or stuck rank (docs/scale.md says why 2 h)
lock_stale_s = 120.0  # out_dir's lock may be taken over after this long without its run's refresh
# rollout
enable_thinking = True
max_new_tokens = 8192
temperature = 0.6
top_p = 0.95
top_k = 20
repetition_penalty = 1.0
presence_penalty = 1.0
# judge
judge_url = "https://generativelanguage.googleapis.com/v1beta/openai"
judge_model = "gemini-3-flash-preview"
judge_key_env = "GEMINI_API_KEY"
judge_workers = 16  # threads per rank
judge_timeout = 300.0  # seconds per request
judge_retries = 6  # on 429, 5xx, timeouts, connection errors
judge_reasks = 2  # when a reply does not parse
judge_backoff_max = 60.0
judge_extra = {"reasoning_effort": "low"}  # passed through in the request body
judge_max_tokens = 8192  # reply cap, sent as max_completion_tokens (0: none)
judge_max_reply_bytes = 1_000_000  # a larger reply is a failure: never parsed, re-asked or cached
judge_max_fail_frac = 0.5  # stop the run when more of a step's stories than this could not be scored
judge_price_in, judge_price_out = 0.50, 3.00  # dollars per million tokens
length_weight = 25.0
# -----------------------------------------------------------------------------
config = configure(globals())
safe_config = {k: redact_url(v) if isinstance(v, str) else v for k, v in config.items()}  # no key from a URL is stored
ddp = int(os.environ.get("RANK", -1)) != -1  # torchrun sets RANK
ddp_rank = int(os.environ.get("RANK", 0))
ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
master_process = ddp_rank == 0
stop, phase = [], "starting"  # the signal that asked the run to stop, and what the run was doing


def on_signal(signum, frame):
    """SIGTERM (a cluster's preemption) or Ctrl-C: stop at the next safe point; a second one at once."""
    if stop:
        os._exit(128 + signum)  # a checkpoint being written stays a .tmp_ folder, never a ckpt_
    stop.append(signal.Signals(signum).name)
    print(f"\n{stop[0]} while {phase}: stopping at the next safe point; a second signal exits at once",
          file=sys.stderr, flush=True)


def on_error(kind, e, tb):
    """A collective that failed (a peer died, or one waited dist_timeout_s for a stuck one): one line
    naming the step instead of gloo's or nccl's traceback. Any other error keeps its traceback."""
    if ddp and isinstance(e, RuntimeError) and any(w in str(e) for w in ("gloo", "NCCL", "Connection", "imed out")):
        where = f"step {globals()['step'] + 1}" if "step" in globals() else "start-up"
        print(f"error: {where}: a collective with the other ranks failed: {str(e).splitlines()[0][:300]}. "
              f"A rank died, or waited dist_timeout_s={dist_timeout_s:g} for a stuck one; the newest checkpoint "
              "continues the run (--resume=auto)", file=sys.stderr, flush=True)
    else:
        sys.__excepthook__(kind, e, tb)


sys.excepthook = on_error
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)

# -----------------------------------------------------------------------------
# checks before any model work: the config, out_dir, the data (each bad row named), the judge
ref_fixed = preflight.check_config(config, ddp_world_size, judge_lib.RANGES)
ckpt = preflight.find_checkpoint(out_dir, resume, resume_from)  # the checkpoint this run continues, or None
import transformers  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402
try:
    if init_from == "tiny" and not ckpt:  # a tokenizer trained on the data: the rows are checked first
        preflight.load_rows(train_data, max_words=max_ref_words)
        model, tok = tiny.build_tiny([train_data], tiny_vocab, tiny_hidden, tiny_layers, seed)
        model_config = model.config
    else:
        tok = AutoTokenizer.from_pretrained(ckpt or init_from)
        model_config = AutoConfig.from_pretrained(ckpt or init_from)
    rows, data_sha, longest = preflight.load_data(
        train_data, tok, positions=model_config.get_text_config().max_position_embeddings, max_ref_words=max_ref_words,
        enable_thinking=enable_thinking, max_new_tokens=max_new_tokens, n_ref=n_ref)
    judge = judge_lib.judge_from_config(config, cache_dir=os.path.join(out_dir, "judge_cache"))
except FileNotFoundError as e:
    fail(f"train_data: {e}")
except (OSError, ValueError) as e:
    fail(str(e))
state = preflight.check_resume(ckpt, config, data_sha) if ckpt else {}

# -----------------------------------------------------------------------------
# ranks: about fifteen lines, no wrapper
if ddp:
    # CPU tensors (the per-step agreements) go over gloo, GPU tensors (gradients, weights) over
    # nccl; a rank that waits dist_timeout_s for the others raises instead of waiting forever
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
if "cuda" not in device:  # Qwen3.5's fast linear-attention kernels are CUDA-only: their absence is no news
    logging.getLogger("transformers.integrations.hub_kernels").addFilter(lambda r: "falling back" not in r.getMessage())
if not sys.stderr.isatty():  # progress bars only on a terminal: in a log file they are lines of carriage returns
    transformers.utils.logging.disable_progress_bar()

# -----------------------------------------------------------------------------
# the model: the memory plan from the config alone, one real judge call, then the weights.
# Checkpoints are written in the format of base_dir, the folder the run started from.
base_dir = checkpoint.base_folder(init_from, out_dir)
if init_from != "tiny" or ckpt:
    policy_cls = checkpoint.policy_class(model_config)  # Qwen3_5ForConditionalGeneration for the hub's 9B
    with torch.device("meta"):  # counted, not allocated
        model = policy_cls._from_config(model_config)
    checkpoint.freeze_vision(model)
n_params = sum(p.numel() for p in model.parameters())
n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
tokens = max(micro_batch_tokens, longest)  # the longest micro-batch: the budget, or one longer sequence
preflight.check_memory(n_params, n_trainable, ddp_world_size, ptdtype.itemsize, tokens=tokens, verbose=master_process,
                       activations=preflight.activation_bytes(model_config, tokens, logprob_chunk, gradient_checkpointing,
                                                              ptdtype.itemsize),
                       budget=device_memory_gb * 1e9 or (torch.cuda.get_device_properties(device).total_memory
                                                         if "cuda" in device else 0))
preflight.probe_judge(judge, rows[0], stop)
release_lock = preflight.take_lock(out_dir, lock_stale_s) if master_process else (lambda: None)  # before any write
if init_from == "tiny" and not ckpt:
    if master_process:  # the tiny run's base model: its checkpoints' format, and evaluation's baseline
        model.save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
else:
    model = policy_cls.from_pretrained(ckpt or init_from, dtype=ptdtype)
    checkpoint.freeze_vision(model)
model.to(device=device, dtype=ptdtype)
if gradient_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if ddp:
    dist.barrier()  # the tiny base is on disk before any rank reads it
kl_model = None
if kl_coef:  # a frozen copy of the initial policy, loaded only when the KL term is on
    kl_model = checkpoint.policy_class(AutoConfig.from_pretrained(base_dir)).from_pretrained(base_dir, dtype=ptdtype)
    kl_model.to(device=device, dtype=ptdtype).eval().requires_grad_(False)
eos = rollout.eos_ids(model, tok)
# AdamW sharded over the ranks, gradients summed in fp32 at each parameter's owner (optim.py)
opt = ShardedAdamW([p for p in model.parameters() if p.requires_grad], ddp_world_size, ddp_rank,
                   (beta1, beta2), weight_decay=weight_decay, piece_numel=piece_numel)
start_step = state.get("step", 0)
if ckpt:
    checkpoint.restore(ckpt, opt, ddp_rank, ddp_world_size)
    if master_process:
        print(f"resuming from {ckpt} at step {start_step}")
        err = checkpoint.trim_logs(out_dir, start_step)
        if err:
            fail(f"{err}; the logs are unchanged. Free some space and run the same command again")
if ddp:
    preflight.check_ranks(start_step, data_sha, ddp_world_size)
run_id = state.get("run_id") or f"{time.strftime('%Y%m%d%H%M%S')}{random.Random().randrange(16 ** 6):06x}"
if master_process:
    for tmp in glob.glob(os.path.join(out_dir, ".tmp_ckpt_*")):
        shutil.rmtree(tmp)  # a checkpoint whose writer was killed
    logs = [f for f in ("metrics.jsonl", "rollouts.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    if not ckpt and logs:  # resume='auto' and a run killed before its first checkpoint: start over
        aside = os.path.join(out_dir, f"abandoned_{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(aside)
        for f in logs:
            os.rename(os.path.join(out_dir, f), os.path.join(aside, f))
        print(f"{out_dir} held logs but no checkpoint: starting over, the old logs moved to {aside}")
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=safe_config, id=run_id, resume="allow")

# -----------------------------------------------------------------------------
# the pieces of a step


def step_rows(step):
    """The step's batch_groups (group id, row): a fresh permutation of the data each epoch."""
    out = []
    for k in range(step * batch_groups, (step + 1) * batch_groups):
        epoch, i = divmod(k, len(rows))
        out.append((k % batch_groups, rows[np.random.default_rng(seed + epoch).permutation(len(rows))[i]]))
    return out


def micro_batch_loss(mb, old_logp, denom, padding):
    """Forward, loss and backward of one micro-batch; returns its sums for the metrics. The hooks
    of optim.py take each gradient to its owner rank; a padding pass adds zero gradient."""
    ids, attn, mask = (t.to(device) for t in rollout.collate(mb, tok.pad_token_id))
    logp, ent = rollout.token_logprobs(model, ids, attn, mask, temperature, logprob_chunk)  # (B, T-1)
    old_logp = logp.detach() if old_logp is None else old_logp
    adv = torch.tensor([s.adv for s in mb], device=device)  # (B,)
    is_ref = torch.tensor([s.is_ref for s in mb], device=device)  # (B,)
    kl_logp, weight, out = None, None, {}
    if kl_coef:
        with torch.no_grad():
            kl_logp = rollout.token_logprobs(kl_model, ids, attn, mask, temperature, logprob_chunk)[0]
    if not plain_sampling:  # the sampler's mismatch: pi_old / pi_sample on sampled tokens, truncated at tis_cap
        sampled = mask.bool() & ~is_ref[:, None]
        sample_logp = torch.full_like(old_logp, math.nan)
        for b, s in enumerate(mb):
            if not s.is_ref:
                sample_logp[b, len(s.prompt_ids) - 1:len(s.prompt_ids) - 1 + len(s.sample_logp)] = torch.tensor(s.sample_logp)
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


def log_step(step, my_rows, groups, acc, t0):
    """Reduce the step's metrics over ranks (sums, and [sum, count] pairs for the means), print the
    step line, append metrics.jsonl and rollouts.jsonl. Returns whether a rank was asked to stop."""
    rolls = [s for g in groups for s in g if not s.is_ref]
    refs = [s for g in groups for s in g if s.is_ref]

    def pair(values):  # NaN (a failed judgement) counts nowhere
        v = [x for x in values if not math.isnan(x)]
        return [sum(v), len(v)]
    rank = [1.0 + sum(s.judged["reward"] > g[-1].judged["reward"] for s in g) for g in groups  # 1: the group's best
            if n_ref and not math.isnan(g[-1].judged["reward"])]
    means = dict(reward=pair(s.judged["reward"] for s in rolls), ref_reward=pair(s.judged["reward"] for s in refs),
                 sq=pair(s.judged["sq"] for s in rolls), length_ratio=pair(s.judged["ratio"] for s in rolls),
                 truncated=pair(s.truncated for s in rolls), truncated_in_thinking=pair(s.in_thinking for s in rolls),
                 ref_nll=[acc["ref_nll"], acc["ref_tok"]], entropy=[acc["ent_sum"], acc["ent_tok"]],
                 ref_adv=pair(s.adv for s in refs if not math.isnan(s.judged["reward"])),
                 ref_adv_neg=pair(float(s.adv < 0) for s in refs if not math.isnan(s.judged["reward"])),
                 ref_rank=pair(rank), is_ratio_mean=[acc["is_sum"], acc["is_tok"]] if acc["is_tok"] else [1.0, 1.0],
                 is_clipped_frac=[acc["is_clip"], acc["is_tok"]] if acc["is_tok"] else [0.0, 1.0])
    stories = rolls + refs
    totals = dict(zero_std_groups=acc["zero_std"], idle_passes=acc["idle"], stop=len(stop),
                  judge_failures=sum(s.judged["error"] is not None for s in stories),
                  judge_tokens=sum(s.judged["tokens_in"] + s.judged["tokens_out"] for s in stories),
                  judge_cost=sum(s.judged["cost"] for s in stories), loss_on=acc["loss_on"] / num_iterations,
                  loss_off=acc["loss_off"] / num_iterations, gen_tokens=sum(len(s.completion_ids) for s in rolls),
                  train_tokens=acc["train_tokens"], t_generate=acc["t_generate"], t_judge_wait=acc["t_judge_wait"],
                  t_train=acc["t_train"], t_sync=acc["t_sync"], t_checkpoint=acc["t_checkpoint"])
    pairs = torch.tensor(list(means.values()), dtype=torch.float64)  # (M, 2)
    sums = torch.tensor(list(totals.values()), dtype=torch.float64)  # (S,)
    if ddp:
        dist.all_reduce(pairs)
        dist.all_reduce(sums)
    m = {k: s / n if n else math.nan for k, (s, n) in zip(means, pairs.tolist())}
    m.update(zip(totals, sums.tolist()))
    m["loss"] = m["loss_on"] + m["loss_off"]
    if not n_ref:
        m["loss_off"] = math.nan  # no references: the loss is the sampled stories' alone
    for k in ("t_generate", "t_judge_wait", "t_train", "t_sync", "t_checkpoint"):
        m[k] /= ddp_world_size  # mean seconds per rank
    stopping = m.pop("stop") > 0
    m.update(step=step, t_step=time.time() - t0, grad_norm=acc["grad_norm"], skipped=acc["skipped"], lr=acc["lr"],
             gen_tok_per_s=m["gen_tokens"] / max(m["t_generate"] * ddp_world_size, 1e-9),
             train_tok_per_s=m["train_tokens"] / max(m["t_train"] * ddp_world_size, 1e-9))
    records = [dict(step=step, group=gid, id=row["id"], is_ref=s.is_ref, story=s.text,
                    thinking_words=rubric.count_words(s.thinking), truncated=s.truncated, adv=s.adv,
                    **{k: s.judged[k] for k in ("reward", "sq", "ratio", "scores", "error")})
               for (gid, row), g in zip(my_rows, groups) for s in g]
    if ddp:
        gathered = [None] * ddp_world_size if master_process else None
        dist.gather_object(records, gathered, dst=0)
        records = [r for part in (gathered or []) for r in part]
    if master_process:  # what a person watches; everything else is in metrics.jsonl (docs/training.md)
        print(f"step {step + 1}/{max_steps} | reward {m['reward']:.1f} (ref {m['ref_reward']:.1f}) | sq {m['sq']:.1f} | "
              f"len {m['length_ratio']:.2f} | entropy {m['entropy']:.2f} | gnorm {m['grad_norm']:.2f}"
              + (" SKIPPED" if m["skipped"] else "") + (f" | judge fail {m['judge_failures']:.0f}" if m["judge_failures"]
                                                        else "") + f" | ${m['judge_cost']:.2f} | {m['t_step']:.0f}s",
              flush=True)
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")
        with open(os.path.join(out_dir, "rollouts.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        if wandb_log:
            wandb.log(m, step=step)
    return stopping


def judge_stops_run(step, groups, asked, failed, fatal):
    """The judge failed for good, or for more than judge_max_fail_frac of the stories: every rank stops."""
    judge.cancel()
    reasons = collections.Counter(s.judged["error"] for g in groups for s in g if s.judged["error"])
    if ddp:
        parts = [None] * ddp_world_size
        dist.all_gather_object(parts, reasons)
        reasons = sum(parts, collections.Counter())
    why = "a judge failure that no retry can fix" if fatal else \
        f"{failed:.0f} of {asked:.0f} stories could not be scored (judge_max_fail_frac={judge_max_fail_frac})"
    fail(f"step {step + 1}: {why}; stopped before the update and checkpoint. Reasons: "
         + "; ".join(f"{n} x {e}" for e, n in reasons.most_common(5)))


def stop_run(done, where):
    """Every rank together: checkpoint the last completed step if it has none, then exit at once
    (judge requests still in flight are dropped, not waited for)."""
    judge.cancel()
    if done > saved:
        save_checkpoint(done)
    if master_process:
        print(f"error: stopped by {stop[0]} {where}: " + (f"{out_dir}/ckpt_{done:06d} holds step {done}; run the same "
              "command with --resume=auto to continue" if done else "no step was completed; run the same command to "
              "start again"), file=sys.stderr, flush=True)
    release_lock()
    os._exit(1)


def save_checkpoint(step):
    err = checkpoint.save(out_dir, step, model, opt, base_dir, keep_last=keep_last, rank=ddp_rank, world=ddp_world_size,
                          state=dict(config=safe_config, world_size=ddp_world_size, data_sha256=data_sha, run_id=run_id))
    if err:
        newest = sorted(glob.glob(os.path.join(out_dir, "ckpt_*")))
        fail(f"step {step}: the checkpoint could not be written ({err}); its temporary folder removed. The newest "
             f"checkpoint is {newest[-1] if newest else 'none'}: free some space and run the same command with "
             "--resume=auto")


# -----------------------------------------------------------------------------
# the loop
plain_sampling = presence_penalty == 0 and repetition_penalty == 1 and top_k == 0 and top_p == 1
ref_cache = {}  # row id -> its reference Story, built once
saved, t_ckpt = start_step, 0.0  # the newest checkpoint's step; seconds the last one took
for step in range(start_step, max_steps):
    t0 = time.time()
    my_rows = step_rows(step)[ddp_rank::ddp_world_size]  # rank r owns groups r, r + W, ...

    # 1. sample a group: every group of this rank in one batched decode; a story goes to the
    # judge the step it ends, while longer ones are still decoding
    phase = "generating"
    model.eval()
    pending = []  # (story, the judge's future)

    def to_judge(i, j, story):
        if not stop:
            pending.append((story, judge.submit(my_rows[i][1]["prompt"], my_rows[i][1]["target_words"], story.text)))
    bar = tqdm(total=max_new_tokens, desc=f"step {step + 1}: decoding", unit="tok", leave=False,
               disable=not (master_process and sys.stderr.isatty()))
    groups = rollout.sample(
        model, tok, [rollout.render_prompt(tok, row["prompt"], enable_thinking) for _, row in my_rows],
        seeds=[seed + 100_003 * step + gid for gid, _ in my_rows], n=group_size - n_ref, eos=eos,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty, enable_thinking=enable_thinking,
        on_done=to_judge, on_step=lambda: bar.update(1), should_stop=lambda: bool(stop))
    bar.close()
    t_generate = time.time() - t0

    # 2. inject the reference: the human story joins its group, last, teacher-forced
    for i, (_, row) in enumerate(my_rows if n_ref else []):
        if row["id"] not in ref_cache:
            ref_cache[row["id"]] = rollout.reference_story(tok, row, enable_thinking, eos, ref_mask_think)
        ref = dataclasses.replace(ref_cache[row["id"]])  # this step's copy, for its judgement and advantage
        if ref_fixed is None:
            to_judge(i, None, ref)
        else:
            ref.judged = judge_lib.fixed(ref_fixed)
        groups[i].append(ref)

    # 3. judge: wait for every score; a judge that cannot score stops every rank before the update
    phase, t1 = "waiting for the judge", time.time()
    while not stop and concurrent.futures.wait([f for _, f in pending], timeout=0.5).not_done:
        pass  # woken twice a second to see a stop signal
    if stop:
        judge.cancel()
    else:
        for story, future in pending:
            story.judged = future.result()
    failed = sum(s.judged["error"] is not None for s, _ in pending) if not stop else 0
    fatal = sum(s.judged["fatal"] for s, _ in pending) if not stop else 0
    health = torch.tensor([len(pending), failed, fatal, len(stop)], dtype=torch.float64)
    if ddp:
        dist.all_reduce(health)  # every rank decides alike
    asked, failed, fatal, stopping = health.tolist()
    if stopping:
        stop_run(step, f"in step {step + 1} (abandoned before its update)")
    if fatal or failed > judge_max_fail_frac * asked:
        judge_stops_run(step, groups, asked, failed, fatal)

    # 4. advantages: over each whole group, the reference included
    acc = collections.Counter(zero_std=0)
    for group in groups:
        A, zero_std = rollout.group_advantages(torch.tensor([s.judged["reward"] for s in group], dtype=torch.float64),
                                               scale_rewards)
        for s, a in zip(group, A.tolist()):
            s.adv = a
        acc["zero_std"] += zero_std
    t_judge = time.time() - t1

    # 5. loss: micro-batches of about micro_batch_tokens tokens, the loss's denominator counted over every rank
    phase, t2 = "training", time.time()
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
            old_logps = [rollout.token_logprobs(model, *(t.to(device) for t in rollout.collate(mb, tok.pad_token_id)),
                                                temperature, logprob_chunk)[0] for mb in micro]
    lr = learning_rate * min(1.0, (step + 1) / max(1, warmup_steps))  # linear warmup, then constant
    for it in range(num_iterations):
        for k, mb in enumerate(micro):
            sums = micro_batch_loss(mb, old_logps[k], denom, padding=k >= len(micro) - idle)
            acc.update(sums if it == 0 else {k: v for k, v in sums.items() if k.startswith("loss_")})

        # 6. update over ranks: the global gradient norm, clipping, the sharded AdamW
        t3 = time.time()
        acc["grad_norm"] = grad_norm = opt.grad_norm()
        if math.isfinite(grad_norm):
            opt.step(lr, min(1.0, grad_clip / (grad_norm + 1e-6)) if grad_clip else 1.0)  # torch's clip_grad_norm_ eps
        else:
            opt.zero_grad()
            acc["skipped"] += 1  # alike on every rank: the norm is of the gradients summed over ranks
        acc["t_sync"] += time.time() - t3
    acc.update(lr=lr, t_generate=t_generate, t_judge_wait=t_judge, t_train=time.time() - t2 - acc["t_sync"],
               t_checkpoint=t_ckpt)

    stopping = log_step(step, my_rows, groups, acc, t0)
    phase, t_ckpt = "writing a checkpoint", time.time()  # logged with the next step
    if (step + 1) % save_interval == 0 or step + 1 == max_steps:
        save_checkpoint(step + 1)
        saved = step + 1
    t_ckpt = time.time() - t_ckpt
    if stopping:
        stop_run(step + 1, f"during step {step + 1}, after its update")

judge.close()
if master_process:
    final = os.path.join(out_dir, f"ckpt_{max_steps:06d}")
    print(f"done: {max_steps} steps; the final checkpoint is {final}\nnext: python eval.py --task=generate "
          f"--model={final} --out={out_dir}/eval_gens.jsonl (docs/evaluation.md)")
if ddp:
    dist.destroy_process_group()
