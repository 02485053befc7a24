"""
POLARIS: GRPO with an LLM-judge reward and human-reference injection, for long-form stories.

    python train.py config/tiny.py                                  # CPU, tiny model, local judge
    torchrun --standalone --nproc_per_node=2 train.py config/tiny.py   # the same with 2 gloo ranks
    torchrun --standalone --nproc_per_node=4 train.py config/polaris.py  # the paper run, 4x A100 80GB
    python train.py config/tiny.py --resume=auto                    # start, or continue from the newest checkpoint
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py config/polaris.py
                                                                    # on each of 2 nodes (docs/scale.md)

The algorithm's choices, in the order they happen each step:
1. Groups. batch_groups prompts per step; for each, the policy samples group_size - n_ref
   stories (thinking on for the paper run), and n_ref human stories for the same prompt join
   the group (HRI). Each rank owns whole groups (batch_groups / world) and decodes all of its
   stories in one batch; a story depends on (seed, step, group) alone, whatever the batch.
2. Reward. Every story, the human one included (ref_reward='judge'), is scored by the LLM
   judge on the 16-dimension rubric: R = SQ - length_weight * (1 - length_score). The thinking
   trace is stripped before judging; a story truncated inside its thinking is empty and gets
   the minimum reward. Judging overlaps generation: a story goes to the judge's thread pool
   the step it ends, while longer ones are still decoding.
3. Advantage. Over the whole group, reference included: (R - mean) / (std + eps), or R - mean
   with scale_rewards='none'. A NaN reward (the judge failed) is left out and gets A = 0.
4. Reference tokens. The human story is teacher-forced as the tokens the policy would emit
   after its generation prompt: an empty thinking block, the story, the end-of-turn token.
   Only the story and end-of-turn token are trained (ref_mask_think): training the empty
   thinking block with a high advantage would teach the policy to stop thinking.
5. Loss. On-policy, one optimizer step per batch (num_iterations=1): the PPO ratio is exactly
   1, clipping never acts, and the gradient is -A * grad(log p) at the sampling temperature.
   A presence penalty, top-k or top-p draw tokens from another distribution than the policy's:
   each sampled token's term is weighted by min(pi_old / pi_sample, tis_cap), detached
   (truncated importance sampling, as TRL and verl correct a sampler's mismatch).
   With num_iterations > 1 the batch is reused with clipping (epsilon, epsilon_high). Token
   mean over all ranks and micro-batches (loss_norm='token'); 'seq' and 'constant' for the
   original GRPO and Dr. GRPO (rollout.grpo_loss says what each weighs). KL to the initial
   policy only if kl_coef > 0. ref_shaping_gamma > 0 replaces the reference tokens' log p by
   LUFFY's p / (p + gamma), which damps imitation of tokens the policy already finds likely.
6. Update. As backward finishes each gradient it is summed in fp32 at the rank that owns the
   parameter (optim.py, ZeRO-2 by hand); the global norm is clipped; each owner applies AdamW
   to its fp32 master copy and broadcasts the new weights. A step whose gradient is not finite
   is skipped.
"""
import atexit
import collections
import concurrent.futures
import datetime
import glob
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import judge as judge_lib
import rollout
import rubric
from configurator import check_ranges, configure, redact_url
from optim import ShardedAdamW

# -----------------------------------------------------------------------------
# default config: the paper run (config/polaris.py repeats it with the reasons)
# I/O
out_dir = "out/polaris"
save_interval = 20  # checkpoint every this many steps, and at the end
keep_last = 3  # checkpoints kept on disk
resume = False  # True: continue from the newest checkpoint in out_dir; 'auto': that if there is one, else start
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
group_size = 6  # samples per group, the human reference included
n_ref = 1  # human references per group; 0 turns HRI off
ref_reward = "judge"  # 'judge', or a fixed reward for the reference such as '60'
ref_mask_think = True
ref_shaping_gamma = 0.0  # > 0: LUFFY's policy shaping of the reference's tokens, f(p) = p / (p + gamma); 0.1 in LUFFY
scale_rewards = "group"  # 'group': (R - mean) / (std + eps); 'none': R - mean
loss_norm = "token"  # 'token' (DAPO: every token alike), 'seq' (GRPO: every story alike), 'constant' (Dr. GRPO)
num_iterations = 1  # optimizer steps per batch; > 1 reuses it with PPO clipping
epsilon, epsilon_high = 0.2, 0.28
kl_coef = 0.0
learning_rate = 1e-6
warmup_steps = 10
weight_decay = 0.0
beta1, beta2 = 0.9, 0.99
grad_clip = 1.0
micro_batch_tokens = 9216  # tokens per forward/backward, padding counted: one 8k-token story, or several short
logprob_chunk = 1024  # rows of the LM head computed at once
bucket_numel = 2 ** 26  # elements per fp32 piece in the optimizer and its collectives
tis_cap = 2.0  # truncated importance weight min(pi_old / pi_sample, tis_cap) for the sampler's mismatch; 0: off
seed = 1337
dist_timeout_s = 7200.0  # a collective waits this long for a dead or stuck rank (docs/scale.md says why 2 h)
lock_stale_s = 120.0  # out_dir's lock, refreshed by its run, may be taken over after this long without a refresh
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


def fail(msg):
    sys.exit(f"error: {msg}")


stop = []  # the signal that asked the run to stop; the loop stops at its next safe point


def on_signal(signum, frame):
    if stop:  # a second signal: at once (a checkpoint being written stays a .tmp_ folder, never a ckpt_)
        os._exit(128 + signum)
    stop.append(signal.Signals(signum).name)
    print(f"\n{stop[0]} while {globals().get('phase', 'starting')}: stopping at the next safe point; a second signal "
          "exits at once", file=sys.stderr, flush=True)


def on_error(kind, e, tb):
    """A collective that failed (a peer died, or waited dist_timeout_s for a stuck one): one line naming
    the step instead of gloo's or nccl's traceback. Any other error keeps its traceback."""
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


def take_lock(path):
    """One run per out_dir: the lock names its holder (pid, host, since when), is refreshed every
    lock_stale_s / 4 seconds while the run lives, and is removed at its exit. A lock whose process
    is gone from this host, or that nobody refreshed for lock_stale_s (a holder on another host,
    as after a requeue), is taken over, and that is said."""
    me = dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S"))
    for _ in range(2):
        try:
            os.makedirs(out_dir, exist_ok=True)
            with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as f:
                json.dump(me, f)
            break
        except FileExistsError:
            pass
        except OSError as e:  # a full disk, a read-only folder
            if os.path.exists(path) and not os.path.getsize(path):
                os.remove(path)
            fail(f"cannot write {path}: {e.strerror}")
        try:
            held, age = json.load(open(path)), time.time() - os.path.getmtime(path)
        except (OSError, ValueError):
            held, age = {}, math.inf  # half-written by a writer that died at once
        gone = held.get("host") == me["host"] and (held.get("pid") == me["pid"] or not alive(held.get("pid")))
        if not gone and age < lock_stale_s:
            fail(f"out_dir={out_dir} is in use by pid {held.get('pid')} on {held.get('host')} since "
                 f"{held.get('since')} (refreshed {age:.0f} s ago; {path} is stale after lock_stale_s="
                 f"{lock_stale_s:g} s): wait for it, stop it, or use another out_dir")
        print(f"taking over {path} from pid {held.get('pid')} on {held.get('host')}: "
              + ("not running" if gone else f"not refreshed for {age:.0f} s"))
        os.remove(path)
    else:
        fail(f"another run took {path} at the same moment")

    def release():
        try:
            if json.load(open(path)) == me:
                os.remove(path)
        except (OSError, ValueError):
            pass  # taken over: not ours to remove

    def refresh():
        while True:
            time.sleep(lock_stale_s / 4)
            try:
                os.utime(path)
            except OSError:
                return
    atexit.register(release)
    threading.Thread(target=refresh, daemon=True).start()
    return release


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError):
        pass  # another user's process, or no pid recorded
    return True


# --- validate everything that can be checked before a model is loaded or a file is written
check_ranges(config, dict(
    rollout.SAMPLING_RANGES, **judge_lib.RANGES, learning_rate="> 0", max_steps=">= 1", save_interval=">= 1",
    keep_last=">= 1", warmup_steps=">= 0", batch_groups=">= 1", max_ref_words=">= 1", weight_decay=">= 0",
    ref_shaping_gamma=">= 0", tis_cap=">= 0", dist_timeout_s="> 0", lock_stale_s="> 0", beta1="[0, 1)", beta2="[0, 1)", grad_clip=">= 0", micro_batch_tokens=">= 1",
    logprob_chunk=">= 1", bucket_numel=">= 1", epsilon="> 0", epsilon_high="> 0", kl_coef=">= 0",
    num_iterations=">= 1", device_memory_gb=">= 0"))
try:
    rollout.check_sampling(repetition_penalty, presence_penalty)
except ValueError as e:
    fail(str(e))
if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
    fail("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment: with torchrun's store "
         "shared, a restarted rank can read the last attempt's addresses and fail to connect (pytorch issue 135712)")
if batch_groups % ddp_world_size:
    fail(f"batch_groups={batch_groups} does not divide over {ddp_world_size} ranks: each rank owns whole groups")
if n_ref not in (0, 1) or group_size < 2 + n_ref:
    fail(f"n_ref={n_ref}, group_size={group_size}: n_ref is 0 or 1 (one human story per prompt), "
         "with at least 2 sampled stories")
for key, allowed in (("loss_norm", ("token", "seq", "constant")), ("scale_rewards", ("group", "none")),
                     ("dtype", ("float32", "bfloat16"))):
    if config[key] not in allowed:
        fail(f"{key}={config[key]!r} must be one of {allowed}")
try:
    ref_fixed = None if ref_reward == "judge" else float(ref_reward)
except ValueError:
    fail(f"ref_reward={ref_reward!r} must be 'judge' or a number")
# out_dir: a new run never mixes into an old one; a resumed run continues exactly what it was
ckpts = sorted(glob.glob(os.path.join(out_dir, "ckpt_*")))
logs = [f for f in ("metrics.jsonl", "rollouts.jsonl") if os.path.exists(os.path.join(out_dir, f))]
if resume not in (False, True, "auto"):
    fail(f"resume={resume!r} must be False, True or 'auto'")
if resume is True and not ckpts and not resume_from:
    fail(f"--resume=True but no checkpoint in {out_dir} (--resume=auto starts a run when there is none)")
if resume is False and not resume_from and (ckpts or logs):
    fail(f"out_dir={out_dir} already holds a run (checkpoints or metrics): use --resume=auto to continue it, "
         "or another out_dir")
ckpt = resume_from or (ckpts[-1] if resume and ckpts else None)  # the checkpoint this run continues, if any
if ckpt:
    bad = rollout.damaged_checkpoint(ckpt)
    if bad:
        whole = next((c for c in reversed(ckpts) if c != ckpt and not rollout.damaged_checkpoint(c)), None)
        fail(f"cannot resume from {ckpt}: {bad}. " + (f"{whole} is complete: continue from it with "
             f"--resume_from={whole}" if whole else "No earlier checkpoint is complete: start another out_dir"))
from transformers import AutoConfig, AutoTokenizer  # noqa: E402
longest = 0  # the longest sequence a row makes: a prompt and max_new_tokens, or a prompt and its reference


def too_long(row):
    """A row whose prompt and story cannot fit the model's positions: refused by name at load time."""
    global longest
    user = [dict(role="user", content=row["prompt"])]
    n = len(rollout.render_prompt(tok, row["prompt"], enable_thinking))
    full = tok.apply_chat_template(user + [dict(role="assistant", content=row["story"])], tokenize=False,
                                   enable_thinking=enable_thinking)
    m = len(tok(full, add_special_tokens=False).input_ids) if n_ref else 0
    longest = max(longest, n + max_new_tokens, m)
    if n + max_new_tokens > positions:
        return f"the prompt is {n:,} tokens: with max_new_tokens={max_new_tokens:,} more than the model's {positions:,}"
    if m > positions:
        return f"the prompt and its reference story are {m:,} tokens, more than the model's {positions:,}"


try:
    if init_from == "tiny" and not ckpt:  # its tokenizer is trained on the data: the rows are checked first
        rubric.load_rows(train_data, max_words=max_ref_words)
        tiny_model, tok = rollout.build_tiny([train_data], tiny_vocab, tiny_hidden, tiny_layers, seed)
        model_config = tiny_model.config
    else:
        tok = AutoTokenizer.from_pretrained(ckpt or init_from)
        model_config = AutoConfig.from_pretrained(ckpt or init_from)
    positions = model_config.get_text_config().max_position_embeddings
    specials = set(rubric.CHAT_MARKERS) | set(tok.all_special_tokens)
    rows = rubric.load_rows(train_data, max_words=max_ref_words, special_tokens=sorted(specials), check=too_long)
    data_sha = hashlib.sha256(open(train_data, "rb").read()).hexdigest()
    judge = judge_lib.judge_from_config(config, cache_dir=os.path.join(out_dir, "judge_cache"))
except FileNotFoundError as e:
    fail(f"train_data: {e}")
except (OSError, ValueError) as e:
    fail(str(e))
if ckpt:  # on every rank, from the checkpoint itself: settings that decide the data order or the batch
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    was = dict(state["config"], train_data_sha256=state["data_sha256"])
    now = dict(config, train_data_sha256=data_sha)
    changed = [f"{k} {was[k]!r} -> {now[k]!r}" for k in ("batch_groups", "group_size", "n_ref", "seed",
                                                          "train_data_sha256") if was[k] != now[k]]
    if changed:
        fail(f"resume: {ckpt} was written with other settings that decide the data order or the batch: "
             + "; ".join(changed) + ". Resume with the same ones, or start another out_dir")

# -----------------------------------------------------------------------------
# distributed set-up: about fifteen lines, no wrapper
if ddp:
    # CPU tensors (the per-step agreements) go over gloo, GPU tensors (gradients, weights) over nccl;
    # a rank that waits dist_timeout_s for the others raises instead of waiting forever
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


def barrier():
    if ddp:
        dist.barrier()


# -----------------------------------------------------------------------------
# model: the memory plan first, from the config alone, so a run that cannot fit stops early.
# Checkpoints are written in the format of base_dir, the folder the run started from.
if init_from == "tiny":
    base_dir = os.path.join(out_dir, "base")
elif os.path.isdir(init_from):
    base_dir = init_from
else:  # a hub id: the local copy that from_pretrained would read (downloaded once, then cached)
    from huggingface_hub import snapshot_download
    base_dir = snapshot_download(init_from)
if init_from == "tiny" and not ckpt:
    model = tiny_model
    n_params = n_trainable = sum(p.numel() for p in model.parameters())
else:
    policy_cls = rollout.policy_class(model_config)  # Qwen3_5ForConditionalGeneration for the hub's 9B
    with torch.device("meta"):  # count parameters without allocating them
        skeleton = policy_cls._from_config(model_config)
    rollout.freeze_vision(skeleton)
    n_params = sum(p.numel() for p in skeleton.parameters())
    n_trainable = sum(p.numel() for p in skeleton.parameters() if p.requires_grad)
# the longest micro-batch: the budget, or one sequence longer than it
tokens = max(micro_batch_tokens, longest)
plan = rollout.memory_plan(n_params, ddp_world_size, ptdtype.itemsize, n_trainable, rollout.activation_bytes(
    model_config, tokens, logprob_chunk, gradient_checkpointing, ptdtype.itemsize))
budget = device_memory_gb * 1e9 or (torch.cuda.get_device_properties(device).total_memory if "cuda" in device else 0)
if master_process:
    frozen = f" ({(n_params - n_trainable) / 1e6:,.1f}M frozen: weights only)" if n_params > n_trainable else ""
    print(f"memory plan per rank: {n_params / 1e6:,.1f}M params{frozen} | weights {plan['weights'] / 1e9:.2f} GB + fp32 grad shard "
          f"{plan['grads'] / 1e9:.2f} GB + AdamW shard {plan['optimizer'] / 1e9:.2f} GB + activations of {tokens:,} tokens "
          f"~{plan['activations'] / 1e9:.2f} GB = {sum(plan.values()) / 1e9:.2f} GB"
          + (f" of {budget / 1e9:.0f} GB" if budget else " (no device limit on CPU)"))
if budget and sum(plan.values()) > 0.9 * budget:
    fail(f"the memory plan ({sum(plan.values()) / 1e9:.1f} GB) does not fit in 90% of {budget / 1e9:.0f} GB per device: "
         "use more ranks or a smaller model")

# one real judge call before the weights load: a rejected key, a wrong URL or model stops here
probe = judge.submit(rows[0]["prompt"], rows[0]["target_words"], rows[0]["story"])
while not stop and concurrent.futures.wait([probe], timeout=0.5).not_done:
    pass
if stop:
    judge_lib.stop(judge, f"stopped by {stop[0]} before the first step")
if probe.result()["fatal"]:
    fail(f"the judge cannot be used: {probe.result()['error']}")
release_lock = take_lock(os.path.join(out_dir, "run.lock")) if master_process else (lambda: None)  # before any write
if init_from == "tiny" and not ckpt:
    if master_process:  # the tiny run's base model: its checkpoints' format, and evaluation's baseline
        model.save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
else:
    model = policy_cls.from_pretrained(ckpt or init_from, dtype=ptdtype)
    rollout.freeze_vision(model)
model.to(device=device, dtype=ptdtype)
if gradient_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
barrier()  # the tiny base is on disk before any rank reads it
ref_model = None
if kl_coef:  # a frozen copy of the initial policy, loaded only when the KL term is on
    ref_model = rollout.policy_class(AutoConfig.from_pretrained(base_dir)).from_pretrained(base_dir, dtype=ptdtype)
    ref_model.to(device=device, dtype=ptdtype).eval().requires_grad_(False)
eos = rollout.eos_ids(model, tok)

# -----------------------------------------------------------------------------
# the optimizer: AdamW sharded over the ranks, gradients summed in fp32 at each parameter's
# owner as backward produces them (ZeRO-2 by hand; optim.py explains it)
opt = ShardedAdamW([p for p in model.parameters() if p.requires_grad], ddp_world_size, ddp_rank,
                   (beta1, beta2), weight_decay=weight_decay, piece_numel=bucket_numel)
start_step = 0
if ckpt:
    # every rank's shard, memory-mapped: each rank takes what it owns now, whatever the world size
    # that saved them (our own files, so weights_only=False is safe: they hold numpy's RNG state)
    shards = [torch.load(f, mmap=True, weights_only=False)
              for f in sorted(glob.glob(os.path.join(ckpt, "optim_rank*.pt")))]
    opt.load_state_dict(shards)
    if len(shards) == ddp_world_size:  # nothing draws from these generators; restored for any code that will
        random.setstate(shards[ddp_rank]["rng"]["python"])
        np.random.set_state(shards[ddp_rank]["rng"]["numpy"])
        torch.set_rng_state(shards[ddp_rank]["rng"]["torch"].cpu())
    del shards
    start_step = state["step"]
    if master_process:
        print(f"resuming from {ckpt} at step {start_step}")
        # drop the rows written after the checkpoint: both files written anew beside the old ones,
        # then swapped in; a full disk leaves both as they were
        paths = [p for p in (os.path.join(out_dir, n) for n in ("metrics.jsonl", "rollouts.jsonl")) if os.path.exists(p)]
        try:
            for path in paths:
                with open(path, encoding="utf-8", errors="replace") as src, open(path + ".tmp", "w") as dst:
                    for line in src:
                        try:
                            if json.loads(line)["step"] < start_step:
                                dst.write(line if line.endswith("\n") else line + "\n")
                        except ValueError:
                            pass  # the half-written last line of a run killed during the append
                    dst.flush()
                    os.fsync(dst.fileno())
        except OSError as e:
            for path in paths:
                if os.path.exists(path + ".tmp"):
                    os.remove(path + ".tmp")
            fail(f"cannot rewrite {path} to drop the rows after step {start_step}: {e.strerror}; the logs are "
                 "unchanged. Free some space and run the same command again")
        for path in paths:
            os.replace(path + ".tmp", path)


def first_error(err):
    """Every rank learns the first error any rank had ('' when none)."""
    errs = [err]
    if ddp:
        errs = [None] * ddp_world_size
        dist.all_gather_object(errs, err)
    return next((e for e in errs if e), "")


def write_error(e):
    """Why a write failed, in words: torch's zip writer reports a full disk as 'unexpected pos'."""
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    free = shutil.disk_usage(out_dir).free
    return why if "No space" in why or free > 2 ** 20 else f"No space left on device, {free:,} bytes free ({why})"


def save_checkpoint(step):
    """The model in the base's format (rollout.save_like_base) plus each rank's optimizer shard,
    written under a temporary name and renamed when complete; the newest keep_last are kept.
    state.pt lists every file's size, so that resume can tell a complete checkpoint from a cut one.
    A write that fails (a full disk) removes the temporary folder and stops the run."""
    final = os.path.join(out_dir, f"ckpt_{step:06d}")
    tmp = os.path.join(out_dir, f".tmp_ckpt_{step:06d}")
    if master_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    err = ""
    try:
        rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
        with open(os.path.join(tmp, f"optim_rank{ddp_rank}.pt"), "wb") as f:  # a file object: OSError names the cause
            torch.save(dict(opt.state_dict(), rng=rng), f)
    except Exception as e:  # noqa: BLE001 -- OSError, or safetensors' and torch's own errors
        err = f"rank {ddp_rank}: {write_error(e)}"
    err = first_error(err)
    if master_process and not err:
        try:
            rollout.save_like_base(model, base_dir, tmp)  # the base's own format, trained tensors swapped in
            files = {f: os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)}
            # what resume checks: the settings and data that decide each step's batch, and the files
            with open(os.path.join(tmp, "state.pt"), "wb") as f:
                torch.save(dict(step=step, config=safe_config, world_size=ddp_world_size, data_sha256=data_sha,
                                files=files, wandb_id=wandb_id), f)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_*")))[:-keep_last]:
                shutil.rmtree(old)
        except Exception as e:  # noqa: BLE001
            err = write_error(e)
    err = first_error(err)
    if err:
        if master_process:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = sorted(glob.glob(os.path.join(out_dir, "ckpt_*")))
        fail(f"step {step}: the checkpoint could not be written ({err}); {tmp} removed. The newest checkpoint is "
             f"{newest[-1] if newest else 'none'}: free some space and run the same command with --resume=auto")


def policy_logprobs(model, mb):
    """A micro-batch of samples -> per-token log-probs and entropies at the sampling temperature
    (B, T-1), and the collated input_ids, attention mask and loss mask."""
    ids, attn, lm = rollout.collate([(s["prompt_ids"], s["completion_ids"], s["mask"]) for s in mb], tok.pad_token_id)
    ids, attn, lm = ids.to(device), attn.to(device), lm.to(device)
    logp, ent = rollout.token_logprobs(model, ids, attn, lm, temperature, logprob_chunk)
    return logp, ent, ids, attn, lm


def sample_logprobs(mb, like):
    """(B, T-1) log-probs of the sampled tokens under the distribution they were drawn from, in
    the loss mask's places; NaN for the human reference's tokens, which were not sampled."""
    out = torch.full_like(like, math.nan)
    for b, s in enumerate(mb):
        if not s["is_ref"]:
            at = len(s["prompt_ids"]) - 1
            out[b, at:at + len(s["sample_logp"])] = torch.tensor(s["sample_logp"])
    return out


def step_rows(step):
    """The step's batch_groups global group ids and rows: a fresh permutation each epoch."""
    out = []
    for k in range(step * batch_groups, (step + 1) * batch_groups):
        epoch, i = divmod(k, len(rows))
        out.append((k % batch_groups, rows[np.random.default_rng(seed + epoch).permutation(len(rows))[i]]))
    return out


def stop_run(done, where):
    """Every rank, together: checkpoint the last completed step if it has none, then exit at once
    (judge requests still in flight are dropped, not waited for)."""
    judge.cancel()
    if done > saved:
        save_checkpoint(done)
    path = os.path.join(out_dir, f"ckpt_{done:06d}")
    if master_process:
        print(f"error: stopped by {stop[0]} {where}: " + (f"{path} holds step {done}; run the same command with "
              "--resume=auto to continue" if done else "no step was completed; run the same command to start again"),
              file=sys.stderr, flush=True)
    release_lock()
    os._exit(1)


plain_sampling = presence_penalty == 0 and repetition_penalty == 1 and top_k == 0 and top_p == 1
wandb_id = state.get("wandb_id") if ckpt else None
wandb_id = wandb_id or f"{time.strftime('%Y%m%d%H%M%S')}{random.Random().randrange(16 ** 6):06x}"
if master_process:
    os.makedirs(out_dir, exist_ok=True)
    for tmp in glob.glob(os.path.join(out_dir, ".tmp_ckpt_*")):
        shutil.rmtree(tmp)  # a checkpoint whose writer was killed
    if not ckpt and logs:  # resume='auto' and a run killed before its first checkpoint: start over
        aside = os.path.join(out_dir, f"abandoned_{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(aside)
        for f in logs:
            os.rename(os.path.join(out_dir, f), os.path.join(aside, f))
        print(f"{out_dir} held logs but no checkpoint: starting over, the old logs moved to {aside}")
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=safe_config, id=wandb_id, resume="allow")
ref_cache = {}  # row id -> (prompt_ids, answer_ids, mask)
t_ckpt = 0.0  # seconds spent writing the previous step's checkpoint
saved = start_step  # the newest checkpoint's step (0: none needed)
if ddp:  # every node must see the same out_dir and the same training data
    views = [None] * ddp_world_size
    dist.all_gather_object(views, (start_step, data_sha))
    if len({v[0] for v in views}) > 1:
        fail(f"the ranks resume from the steps {[v[0] for v in views]}: out_dir must be one folder shared by every node")
    if len({v[1] for v in views}) > 1:
        fail(f"train_data={train_data} differs between the nodes (sha256): copy the same file to every node")

# -----------------------------------------------------------------------------
# training loop
for step in range(start_step, max_steps):
    t0 = time.time()
    my_groups = step_rows(step)[ddp_rank::ddp_world_size]  # rank r owns groups r, r + W, ...

    # --- generate: all of this rank's groups in one batched decode; each story goes to the judge
    # the step it ends, while longer ones are still decoding; the references go first
    model.eval()
    phase = "generating"
    groups = []
    for gid, row in my_groups:
        samples = []
        if n_ref:
            if row["id"] not in ref_cache:
                ref_cache[row["id"]] = rollout.reference_tokens(tok, row["prompt"], row["story"], enable_thinking,
                                                                eos, ref_mask_think)
            p, a, m = ref_cache[row["id"]]
            ref = dict(prompt_ids=p, completion_ids=a, mask=m, is_ref=True, story=row["story"], truncated=False,
                       in_thinking=False, thinking="")
            if ref_fixed is not None:
                ref["judged"] = dict(reward=ref_fixed, sq=math.nan, ratio=1.0, scores=None, error=None, fatal=False,
                                     tokens_in=0, tokens_out=0, cost=0.0, cached=0)
            else:
                ref["future"] = judge.submit(row["prompt"], row["target_words"], row["story"])
            samples.append(ref)
        groups.append((gid, row, samples))
    prompts = [rollout.render_prompt(tok, row["prompt"], enable_thinking) for _, row in my_groups]
    bar = tqdm(total=len(prompts) * (group_size - n_ref), desc=f"step {step + 1} stories", leave=False,
               disable=not master_process)

    def to_judge(i, j, s):  # story j of group i has ended
        if not stop:
            s["future"] = judge.submit(my_groups[i][1]["prompt"], my_groups[i][1]["target_words"], s["story"])
        bar.update(1)
    seeds = [seed + 100_003 * step + gid for gid, _ in my_groups]  # a story depends on (seed, step, group) only
    batch = rollout.sample(model, tok, prompts, seeds, group_size - n_ref, eos, max_new_tokens, temperature, top_p,
                           top_k, repetition_penalty, presence_penalty, enable_thinking, on_done=to_judge,
                           should_stop=lambda: bool(stop))
    bar.close()
    gen_tokens = 0
    for (gid, row, samples), p, sampled in zip(groups, prompts, batch):
        for s in sampled:
            s.update(prompt_ids=p, mask=[1] * len(s["completion_ids"]), is_ref=False)
            gen_tokens += len(s["completion_ids"])
        samples[:0] = sampled  # the sampled stories first, the reference last, as before
    t_gen = time.time() - t0

    # --- wait for the judge; a judge that cannot score stops the run before the update
    phase = "waiting for the judge"
    t1 = time.time()
    futures = [s["future"] for _, _, samples in groups for s in samples if "future" in s]
    while not stop and concurrent.futures.wait(futures, timeout=0.5).not_done:
        pass  # woken twice a second to see a stop signal
    if stop:
        judge.cancel()
    asked, reasons, fatal = 0, collections.Counter(), 0
    for gid, row, samples in groups:
        for s in samples:
            if "future" in s and not stop:
                s["judged"] = j = s.pop("future").result()
                asked, fatal = asked + 1, fatal + j["fatal"]
                reasons.update([j["error"]] if j["error"] else [])
    health = torch.tensor([asked, sum(reasons.values()), fatal, len(stop)], dtype=torch.float64)
    if ddp:
        dist.all_reduce(health)  # stories asked, failed, failed for good, stop asked: every rank decides alike
    if health[3]:
        stop_run(step, f"in step {step + 1} (abandoned before its update)")
    if health[2] or health[1] > judge_max_fail_frac * health[0]:
        if ddp:
            parts = [None] * ddp_world_size
            dist.all_gather_object(parts, reasons)
            reasons = sum(parts, collections.Counter())
        judge.cancel()
        why = "a judge failure that no retry can fix" if health[2] else \
            f"{health[1]:.0f} of {health[0]:.0f} stories could not be scored (judge_max_fail_frac={judge_max_fail_frac})"
        fail(f"step {step + 1}: {why}; stopped before the update and checkpoint. Reasons: "
             + "; ".join(f"{n} x {e}" for e, n in reasons.most_common(5)))

    # --- rewards and group advantages; where the human reference stands in its group
    zero_std, ref_adv, ref_neg, ref_rank = 0, [], [], []
    for gid, row, samples in groups:
        R = torch.tensor([s["judged"]["reward"] for s in samples], dtype=torch.float64)
        A, flat = rollout.group_advantages(R, scale_rewards)
        zero_std += flat
        for s, a in zip(samples, A.tolist()):
            s["adv"] = a
        r = samples[-1]["judged"]["reward"]  # the reference comes last in its group
        if n_ref and not math.isnan(r):
            ref_adv.append(samples[-1]["adv"])
            ref_neg.append(float(samples[-1]["adv"] < 0))  # below its group's mean: HRI pushes away from it
            ref_rank.append(1.0 + (R > r).sum().item())  # 1 = the best story of its group
    t_judge = time.time() - t1

    # --- policy-gradient loss over micro-batches of about micro_batch_tokens tokens
    t2 = time.time()
    model.train()
    phase = "training"
    seqs = [s for _, _, samples in groups for s in samples]
    n_tok = sum(sum(s["mask"]) for s in seqs)
    counts = torch.tensor([n_tok, len(seqs)], dtype=torch.float64)
    if ddp:
        dist.all_reduce(counts)  # trained tokens and sequences over all ranks: the loss's denominator
    denom = {"token": counts[0].item(), "seq": counts[1].item(), "constant": counts[1].item() * max_new_tokens}[loss_norm]
    micro = [[seqs[i] for i in mb] for mb in rollout.micro_batches(
        [len(s["prompt_ids"]) + len(s["completion_ids"]) for s in seqs], micro_batch_tokens)]
    # every rank runs as many backward passes (optim.py's hooks reduce in each one): a rank with
    # fewer micro-batches pads with passes over its shortest sequence that add zero gradient
    n_micro = torch.tensor([len(micro)])
    if ddp:
        dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)
    idle = n_micro.item() - len(micro)
    shortest = min(seqs, key=lambda s: len(s["prompt_ids"]) + len(s["completion_ids"]))
    micro += [[shortest]] * idle
    old_logps = None
    if num_iterations > 1:  # the batch is reused: the ratio needs the log-probs of the policy that sampled it
        with torch.no_grad():
            old_logps = [policy_logprobs(model, mb)[0] for mb in micro]
    loss_on = loss_off = ref_nll = ref_tok = ent_sum = ent_tok = train_tokens = is_sum = is_clip = is_tok = 0.0
    skipped = 0
    t_sync = 0.0
    lr = learning_rate * min(1.0, (step + 1) / max(1, warmup_steps))  # linear warmup, then constant
    for it in range(num_iterations):
        for k, mb in enumerate(micro):
            logp, ent, ids, attn, lm = policy_logprobs(model, mb)
            old = logp.detach() if old_logps is None else old_logps[k]
            ref_logp = None
            if kl_coef:
                with torch.no_grad():
                    ref_logp = rollout.token_logprobs(ref_model, ids, attn, lm, temperature, logprob_chunk)[0]
            adv = torch.tensor([s["adv"] for s in mb], device=device)
            is_ref = torch.tensor([s["is_ref"] for s in mb], device=device)
            weight = None  # the sampler's mismatch: pi_old / pi_sample on sampled tokens, truncated at tis_cap
            if not plain_sampling:
                sampled = lm.bool() & ~is_ref[:, None]
                ratio = torch.exp(old - sample_logprobs(mb, old).to(device)).where(sampled, 1.0)
                if it == 0 and k < len(micro) - idle:
                    is_sum, is_tok = is_sum + ratio[sampled].sum().item(), is_tok + sampled.sum().item()
                    is_clip += (ratio[sampled] > tis_cap).sum().item() if tis_cap else 0
                weight = ratio.clamp(max=tis_cap) if tis_cap else None
            per_seq = rollout.grpo_loss(logp, old, adv, lm, loss_norm, denom, epsilon, epsilon_high, ref_logp, kl_coef,
                                        shaped=is_ref, gamma=ref_shaping_gamma, is_weight=weight)
            if k >= len(micro) - idle:
                (per_seq.sum() * 0.0).backward()  # a padding pass: the hooks' collectives, zero gradient
                continue
            per_seq.sum().backward()  # the hooks of optim.py take each gradient to its owner rank
            loss_on += per_seq[~is_ref].sum().item()
            loss_off += per_seq[is_ref].sum().item()
            if it == 0:
                train_tokens += attn.sum().item()
                ref_nll -= (logp.detach() * lm)[is_ref].sum().item()
                ref_tok += lm[is_ref].sum().item()
                ent_sum += (ent * lm)[~is_ref].sum().item()
                ent_tok += lm[~is_ref].sum().item()
        # --- update: the global gradient norm, clipping, the sharded AdamW
        t3 = time.time()
        grad_norm = opt.grad_norm()
        if math.isfinite(grad_norm):
            opt.step(lr, min(1.0, grad_clip / (grad_norm + 1e-6)) if grad_clip else 1.0)
        else:
            opt.zero_grad()
            skipped += 1  # identical on every rank: the norm is of the gradients summed over ranks
        t_sync += time.time() - t3
    t_train = time.time() - t2 - t_sync

    # --- metrics: each rank adds up [sum, count] pairs for the means and plain sums for the
    # totals; one all_reduce each; then every mean is a sum over ranks / a count over ranks
    rolls, refs = [s for s in seqs if not s["is_ref"]], [s for s in seqs if s["is_ref"]]

    def pair(values):  # NaN (a failed judgement) counts nowhere
        v = [x for x in values if not math.isnan(x)]
        return [sum(v), len(v)]
    means = dict(reward=pair(s["judged"]["reward"] for s in rolls), ref_reward=pair(s["judged"]["reward"] for s in refs),
                 sq=pair(s["judged"]["sq"] for s in rolls), length_ratio=pair(s["judged"]["ratio"] for s in rolls),
                 truncated=pair(s["truncated"] for s in rolls), truncated_in_thinking=pair(s["in_thinking"] for s in rolls),
                 ref_nll=[ref_nll, ref_tok], entropy=[ent_sum, ent_tok], ref_adv=pair(ref_adv), ref_adv_neg=pair(ref_neg),
                 ref_rank=pair(ref_rank), is_ratio_mean=[is_sum, is_tok] if is_tok else [1.0, 1.0],
                 is_clipped_frac=[is_clip, is_tok] if is_tok else [0.0, 1.0])
    totals = dict(zero_std_groups=zero_std, idle_passes=idle, stop=len(stop), judge_failures=sum(s["judged"]["error"] is not None for s in seqs),
                  judge_tokens=sum(s["judged"]["tokens_in"] + s["judged"]["tokens_out"] for s in seqs),
                  judge_cost=sum(s["judged"]["cost"] for s in seqs), loss_on=loss_on / num_iterations,
                  loss_off=loss_off / num_iterations, gen_tokens=gen_tokens, train_tokens=train_tokens, t_generate=t_gen,
                  t_judge_wait=t_judge, t_train=t_train, t_sync=t_sync, t_checkpoint=t_ckpt)
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
    m.update(step=step, t_step=time.time() - t0, grad_norm=grad_norm, skipped=skipped, lr=lr,
             gen_tok_per_s=m["gen_tokens"] / max(m["t_generate"] * ddp_world_size, 1e-9),
             train_tok_per_s=m["train_tokens"] / max(m["t_train"] * ddp_world_size, 1e-9))
    records = [dict(step=step, group=gid, id=row["id"], is_ref=s["is_ref"], story=s["story"],
                    thinking_words=rubric.count_words(s["thinking"]), truncated=s["truncated"], adv=s["adv"],
                    **{k: s["judged"][k] for k in ("reward", "sq", "ratio", "scores", "error")})
               for gid, row, samples in groups for s in samples]
    if ddp:
        gathered = [None] * ddp_world_size if master_process else None
        dist.gather_object(records, gathered, dst=0)
        records = [r for part in (gathered or []) for r in part]
    if master_process:
        print(f"step {step + 1}/{max_steps} | reward {m['reward']:.1f} (ref {m['ref_reward']:.1f}) | sq {m['sq']:.1f} | "
              f"len {m['length_ratio']:.2f} | trunc {m['truncated']:.2f} | zero-std {m['zero_std_groups']:.0f}/{batch_groups} | "
              f"ref adv {m['ref_adv']:+.2f} neg {m['ref_adv_neg']:.2f} rank {m['ref_rank']:.1f} nll {m['ref_nll']:.2f} | "
              f"entropy {m['entropy']:.2f} | loss {m['loss']:.4f} (on {m['loss_on']:.4f} off {m['loss_off']:.4f}) | "
              f"gnorm {grad_norm:.2f}{' SKIPPED' if skipped else ''} | "
              f"judge fail {m['judge_failures']:.0f} ${m['judge_cost']:.3f} {m['judge_tokens'] / 1e3:.1f}k tok | "
              f"gen {m['t_generate']:.1f}s {m['gen_tok_per_s']:.0f} tok/s | judge wait {m['t_judge_wait']:.1f}s | "
              f"train {m['t_train']:.1f}s {m['train_tok_per_s']:.0f} tok/s | sync {m['t_sync']:.1f}s"
              + (f" | checkpoint {m['t_checkpoint']:.1f}s" if m["t_checkpoint"] > 0.05 else ""), flush=True)
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")
        with open(os.path.join(out_dir, "rollouts.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        if wandb_log:
            wandb.log(m, step=step)
    t_ckpt = time.time()  # logged with the next step: a step's row is written before its checkpoint
    if (step + 1) % save_interval == 0 or step + 1 == max_steps:
        save_checkpoint(step + 1)
        saved = step + 1
    t_ckpt = time.time() - t_ckpt
    if stopping:
        stop_run(step + 1, f"during step {step + 1}, after its update")

judge.close()
if ddp:
    dist.destroy_process_group()
