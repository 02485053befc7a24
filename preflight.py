"""
Everything that refuses a bad run before its first step, so that a typo costs seconds, not GPU
hours: the config's ranges and choices, out_dir and resume, the data (each bad row named as
path:line), the memory plan, one real judge call, and the lock that keeps one run per out_dir.
Each check exits non-zero with `error: ...` naming the key, file or line. torch and the model code
are imported by the checks that use them, so that eval.py's pages, which read rows and take locks
here, start without them.
"""
import atexit
import glob
import hashlib
import json
import math
import os
import re
import socket
import sys
import threading
import time

import judge_http
import rubric
from configurator import check_ranges

# the allowed values of train.py's own settings (the judge's live in judge.py)
RANGES = dict(learning_rate="> 0", max_steps=">= 1", save_interval=">= 1", keep_last=">= 1", warmup_steps=">= 0",
              batch_groups=">= 1", max_ref_words=">= 1", weight_decay=">= 0", ref_shaping_gamma=">= 0", tis_cap=">= 0",
              dist_timeout_s="> 0", lock_stale_s="> 0", beta1="[0, 1)", beta2="[0, 1)", grad_clip=">= 0",
              micro_batch_tokens=">= 1", logprob_chunk=">= 1", piece_numel=">= 1", clip_low="> 0", clip_high="> 0",
              kl_coef=">= 0", num_iterations=">= 1", device_memory_gb=">= 0", eval_interval=">= 0")
CHOICES = dict(loss_norm=("token", "seq", "constant"), scale_rewards=("group", "none"), dtype=("float32", "bfloat16"),
               resume=(False, True, "auto"))


# the sampler's settings, which train.py and eval.py share
SAMPLING_RANGES = dict(max_new_tokens=">= 1", temperature="> 0", top_p="(0, 1]", top_k=">= 0",
                       repetition_penalty="> 0", presence_penalty="[-2, 2]")


def check_sampling(repetition_penalty, presence_penalty):
    """The model card: use either penalty, never both at once."""
    if repetition_penalty != 1.0 and presence_penalty != 0.0:
        raise ValueError(f"repetition_penalty={repetition_penalty} and presence_penalty={presence_penalty}: "
                         "set one of them to neutral (1.0 / 0.0); the model card says never both at once")


def fail(msg):
    sys.exit(f"error: {msg}")


def check_config(c, world_size, judge_ranges):
    """Ranges, choices and the settings that must agree with each other."""
    check_ranges(c, dict(SAMPLING_RANGES, **judge_ranges, **RANGES))
    try:
        check_sampling(c["repetition_penalty"], c["presence_penalty"])
    except ValueError as e:
        fail(str(e))
    for key, allowed in CHOICES.items():
        if c[key] not in allowed:
            fail(f"{key}={c[key]!r} must be one of {allowed}")
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        fail("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment: with torchrun's "
             "store shared, a restarted rank can read the last attempt's addresses and fail to connect (pytorch #135712)")
    if c["batch_groups"] % world_size:
        fail(f"batch_groups={c['batch_groups']} does not divide over {world_size} ranks: each rank owns whole groups")
    if c["n_ref"] not in (0, 1) or c["group_size"] < 2 + c["n_ref"]:
        fail(f"n_ref={c['n_ref']}, group_size={c['group_size']}: n_ref is 0 or 1 (one human story per prompt), "
             "with at least 2 sampled stories")
    try:
        return None if c["ref_reward"] == "judge" else float(c["ref_reward"])
    except ValueError:
        fail(f"ref_reward={c['ref_reward']!r} must be 'judge' or a number")


def find_checkpoint(out_dir, resume, resume_from):
    """The checkpoint this run continues, or None for a new run. A new run never mixes into an
    old one; a damaged checkpoint is named with the newest whole one."""
    import checkpoint
    if not out_dir.strip():
        fail("out_dir is empty: name the run's folder, e.g. --out_dir=out/run1")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"out_dir={out_dir} is a file, not a folder: name another out_dir")
    ckpts = checkpoint.by_step(out_dir)
    logs = any(os.path.exists(os.path.join(out_dir, f)) for f in ("metrics.jsonl", "rollouts.jsonl"))
    if resume is True and not ckpts and not resume_from:
        fail(f"--resume=True but no checkpoint in {out_dir} (--resume=auto starts a run when there is none)")
    if resume is False and not resume_from and (ckpts or logs):
        fail(f"out_dir={out_dir} already holds a run (checkpoints or metrics): use --resume=auto to continue it, "
             "or another out_dir")
    ckpt = resume_from or (ckpts[-1] if resume and ckpts else None)
    bad = ckpt and checkpoint.damaged(ckpt)
    if bad:
        whole = next((c for c in reversed(ckpts) if c != ckpt and not checkpoint.damaged(c)), None)
        fail(f"cannot resume from {ckpt}: {bad}. " + (f"{whole} is complete: continue from it with "
             f"--resume_from={whole}" if whole else "No earlier checkpoint is complete: start another out_dir"))
    return ckpt


def check_resume(ckpt, config, data_sha, verbose=True):
    """Every rank reads the checkpoint's state: the settings that decide the data order and the
    batch must be the saved ones; any other setting may change, and each change is printed.
    Returns (state, {setting: [before, now]})."""
    import torch
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    was = dict(state["config"], train_data_sha256=state["data_sha256"])
    now = dict(config, train_data_sha256=data_sha)
    refused = [f"{k} {was[k]!r} -> {now[k]!r}" for k in ("batch_groups", "group_size", "n_ref", "seed",
                                                          "train_data_sha256") if was[k] != now[k]]
    if refused:
        fail(f"resume: {ckpt} was written with other settings that decide the data order or the batch: "
             + "; ".join(refused) + ". Resume with the same ones, or start another out_dir")
    changed = {k: [was[k], v] for k, v in now.items() if k in was and was[k] != v and k not in RESUME_FREE}
    if changed and verbose:
        print("changed on resume: " + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return state, changed


RESUME_FREE = ("out_dir", "resume", "resume_from")  # how a run is found and continued, not what it computes


def load_data(c):
    """The training rows and, when eval_interval is set, the held-out rows, every bad one named as
    path:line, and the held-out prompts checked against the training ones; no tokenizer needed, so
    that a wrong path is named before anything waits on the network. Returns (rows, held-out rows,
    sha256 of the training file)."""
    key = "train_data"
    try:
        rows, eval_rows = load_rows(c["train_data"], max_words=c["max_ref_words"]), []
        key = "eval_data"
        if c["eval_interval"] and not c["eval_data"]:
            fail(f"eval_interval={c['eval_interval']} needs eval_data, held-out rows in train_data's format")
        if c["eval_interval"]:
            eval_rows = load_rows(c["eval_data"], max_words=None)
            same = lambda text: " ".join(text.split()).casefold()  # a trailing space or a capital is the same prompt
            trained = {t["id"] for t in rows} | {same(t["prompt"]) for t in rows}
            seen = [r["id"] for r in eval_rows if r["id"] in trained or same(r["prompt"]) in trained]
            if seen:  # held out means never trained on
                fail(f"eval_data: {len(seen)} of its rows are in train_data too (id {seen[0]!r} first): held-out prompts "
                     "must not be trained on")
    except FileNotFoundError as e:
        fail(f"{key}: {e}")
    except (OSError, ValueError) as e:
        fail(str(e))
    return rows, eval_rows, hashlib.sha256(open(c["train_data"], "rb").read()).hexdigest()


def load_tokenizer(c, ckpt, rows, eval_rows):
    """The tokenizer and the model's config (from the hub, a folder or the checkpoint; the tiny model
    is built now, its tokenizer trained on the data), then the rows checked again with it: no
    special token of this tokenizer, and every prompt with max_new_tokens, and every prompt with
    its reference, within the model's positions. Returns (tok, config, the tiny model or None, the
    longest sequence a row makes)."""
    from transformers import AutoConfig, AutoTokenizer

    import rollout
    import tiny
    tiny_model = None
    try:
        if c["init_from"] == "tiny" and not ckpt:
            tiny_model, tok = tiny.build_tiny([c["train_data"]], c["tiny_vocab"], c["tiny_hidden"], c["tiny_layers"],
                                              c["seed"])
            config = tiny_model.config
        else:
            tok, config = AutoTokenizer.from_pretrained(ckpt or c["init_from"]), AutoConfig.from_pretrained(ckpt or c["init_from"])
    except (OSError, ValueError) as e:
        fail(f"init_from={c['init_from']!r}: {e}")
    positions, new, longest = config.get_text_config().max_position_embeddings, c["max_new_tokens"], 0

    def too_long(row):
        nonlocal longest
        n = len(rollout.render_prompt(tok, row["prompt"], c["enable_thinking"]))
        answer = [dict(role="user", content=row["prompt"]), dict(role="assistant", content=row["story"])]
        full = tok.apply_chat_template(answer, tokenize=False, enable_thinking=c["enable_thinking"]) if c["n_ref"] else ""
        m = len(tok(full, add_special_tokens=False).input_ids)
        longest = max(longest, n + new, m)
        if n + new > positions:
            return f"the prompt is {n:,} tokens: with max_new_tokens={new:,} more than the model's {positions:,}"
        if m > positions:
            return f"the prompt and its reference story are {m:,} tokens, more than the model's {positions:,}"
    specials = sorted(set(CHAT_MARKERS) | set(tok.all_special_tokens))
    try:
        load_rows(c["train_data"], max_words=c["max_ref_words"], special_tokens=specials, check=too_long, warn=False)
        if eval_rows:  # the held-out rows: their prompts, with max_new_tokens, must fit too
            load_rows(c["eval_data"], max_words=None, special_tokens=specials, warn=False,
                      check=lambda row: too_long(dict(row, story="")))
    except (OSError, ValueError) as e:
        fail(str(e))
    return tok, config, tiny_model, longest


# data: one JSON object per line, {"id", "prompt", "target_words", "story"}

MAX_REF_WORDS = 4000  # the paper's references are at most 4,000 words
MAX_TARGET_WORDS = 100_000  # a novel: no model's context holds more; a larger request is a typo
# Qwen's chat-format tokens. A text holding one cannot be rendered faithfully: Qwen3.5's template
# moves whatever precedes </think> out of the answer, so such a story cannot be teacher-forced.
CHAT_MARKERS = ("<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


def row_problem(row, max_words, allow_empty, special_tokens):
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [k for k in ("id", "prompt", "target_words", "story") if k not in row]
    if missing:
        return "missing field " + ", ".join(repr(k) for k in missing)
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
        return f"id must be a string or an integer, got {row['id']!r}"
    if not isinstance(row["prompt"], str) or rubric.is_blank(row["prompt"]):
        return "empty prompt"
    t = row["target_words"]
    if isinstance(t, bool) or not isinstance(t, int) or not 0 < t <= MAX_TARGET_WORDS:
        return f"target_words must be a positive integer up to {MAX_TARGET_WORDS}, got {t!r}"
    if not isinstance(row["story"], str):
        return "story must be a string"
    if not allow_empty and rubric.is_blank(row["story"]):
        return "empty story"
    if max_words and rubric.count_words(row["story"]) > max_words:
        return f"story has {rubric.count_words(row['story'])} words, over max_ref_words={max_words}"
    for field in ("prompt", "story"):
        token = next((t for t in special_tokens if t in row[field]), None)
        if token:
            return f"{field} contains the special token {token!r} of the chat format"
    return None


def load_rows(path, max_words=MAX_REF_WORDS, allow_empty=False, skip_bad=False, special_tokens=CHAT_MARKERS, check=None,
              warn=True):
    """Read and validate a JSONL file. Every bad row is named as path:line and reason; by
    default any bad row raises ValueError (skip_bad=True prints them and drops the rows).
    special_tokens: strings no prompt or story may contain (train.py adds its tokenizer's).
    check(row) -> a reason or None: the caller's own test of a valid row (train.py: its length)."""
    rows, bad, seen = [], [], set()
    with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 is named, not the file
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except UnicodeDecodeError as e:
                bad.append(f"{path}:{i}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})")
                continue
            except json.JSONDecodeError as e:
                bad.append(f"{path}:{i}: invalid JSON ({e.msg})")
                continue
            problem = row_problem(row, max_words, allow_empty, special_tokens) or (check and check(row))
            if problem is None and row["id"] in seen:
                problem = f"duplicate id {row['id']!r}"
            if problem:
                bad.append(f"{path}:{i}: {problem}")
                continue
            seen.add(row["id"])
            rows.append(row)
    if bad and not skip_bad:
        raise ValueError(f"{len(bad)} bad row(s) in {path}:\n  " + "\n  ".join(bad))
    for b in bad:
        print(f"skipping {b}")
    if not rows:
        raise ValueError(f"{path}: no usable rows")
    if warn:
        warn_uncounted(path, rows)
    return rows


def warn_uncounted(path, rows):
    """Once per file, not an error: count_words splits at spaces, so it undercounts text written
    without them (Chinese, Japanese, Thai: an 840-character story is one word) and the length
    score of such a story is wrong. Over 15 letters per word marks it; English averages 5."""
    odd = [r["id"] for r in rows if len(re.findall(r"[^\W_]", r["story"])) > 15 * max(1, rubric.count_words(r["story"]))]
    if odd:
        print(f"warning: {path}: {len(odd)} stories (id {odd[0]!r} first) average over 15 letters per word: "
              "count_words counts words by spaces, and undercounts text written without them (Chinese, Thai, ...)")


def activation_bytes(config, tokens, logprob_chunk, checkpointing, param_bytes):
    """A rough peak for one micro-batch of `tokens` padded tokens: with checkpointing each layer
    keeps its input and one layer at a time is recomputed (~34 x hidden bytes a token,
    Korthikanti et al. 2022); without, every layer keeps its ~34 x hidden. Plus the chunked
    log-prob buffer and its gradient (2 x chunk x vocab x 4 bytes)."""
    c = config.get_text_config()
    per_token = (c.num_hidden_layers * c.hidden_size * param_bytes + 34 * c.hidden_size if checkpointing
                 else c.num_hidden_layers * 34 * c.hidden_size)
    return tokens * per_token + 2 * logprob_chunk * c.vocab_size * 4


def memory_plan(n_params, world_size, param_bytes, n_trainable=None, activations=0):
    """Per-GPU bytes with optim.ShardedAdamW: weights replicated; the fp32 gradient sum (4 bytes)
    and AdamW's fp32 master weights and moments (12 bytes) of the trainable parameters split
    over the ranks; frozen parameters (the 9B's vision tower) as weights only; one micro-batch's
    activations. The bf16 gradients of the layer in backward come on top, freed at once."""
    n_trainable = n_params if n_trainable is None else n_trainable
    return dict(weights=n_params * param_bytes, grads=4 * n_trainable / world_size,
                optimizer=12 * n_trainable / world_size, activations=activations)


def check_memory(model, config, world_size, param_bytes, tokens, logprob_chunk, checkpointing, budget, verbose):
    """Print the plan of `model` (its skeleton on the meta device will do); refuse a run whose
    plan does not fit in 90% of the device."""
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = memory_plan(n_params, world_size, param_bytes, n_trainable,
                       activation_bytes(config, tokens, logprob_chunk, checkpointing, param_bytes))
    total = sum(plan.values())
    if verbose:
        frozen = f" ({(n_params - n_trainable) / 1e6:,.1f}M frozen: weights only)" if n_params > n_trainable else ""
        print(f"memory plan per rank: {n_params / 1e6:,.1f}M params{frozen} | weights {plan['weights'] / 1e9:.2f} GB + "
              f"fp32 grad shard {plan['grads'] / 1e9:.2f} GB + AdamW shard {plan['optimizer'] / 1e9:.2f} GB + activations "
              f"of {tokens:,} tokens ~{plan['activations'] / 1e9:.2f} GB = {total / 1e9:.2f} GB"
              + (f" of {budget / 1e9:.0f} GB" if budget else " (no device limit on CPU)"))
    if budget and total > 0.9 * budget:
        fail(f"the memory plan ({total / 1e9:.1f} GB) does not fit in 90% of {budget / 1e9:.0f} GB per device: "
             "use more ranks or a smaller model")


def quiet(device):
    """Silence what cannot apply: on a CPU, Qwen3.5's fast linear-attention kernels (CUDA-only) are
    no news; off a terminal, progress bars are lines of carriage returns."""
    import logging

    import transformers
    if "cuda" not in device:
        logging.getLogger("transformers.integrations.hub_kernels").addFilter(lambda r: "falling back" not in r.getMessage())
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()


def probe_judge(judge, rows, stop):
    """One real judge call before the weights load: a rejected key, a wrong URL or model stops here."""
    if not judge:
        return
    probe = judge.submit(rows[0]["prompt"], rows[0]["target_words"], rows[0]["story"])
    if not judge_http.wait([probe], stop):
        judge_http.stop(judge, f"stopped by {stop[0]} before the first step")
    if probe.result()["fatal"]:
        fail(f"the judge cannot be used: {probe.result()['error']}")


def check_ranks(start_step, data_sha, world_size):
    """Every node must see the same out_dir (one shared folder) and the same training data."""
    import torch.distributed as dist
    views = [None] * world_size
    dist.all_gather_object(views, (start_step, data_sha))
    if len({v[0] for v in views}) > 1:
        fail(f"the ranks resume from the steps {[v[0] for v in views]}: out_dir must be one folder shared by every node")
    if len({v[1] for v in views}) > 1:
        fail("train_data differs between the nodes (sha256): copy the same file to every node")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError):
        pass  # another user's process, or no pid recorded
    return True


def take_lock(path, stale_s):
    """One run per out_dir (out_dir/run.lock), one annotation page per annotator: the lock file at
    `path` names its holder (pid, host, since when), is refreshed every stale_s / 4 seconds while the run lives and removed at its exit. A lock whose
    process is gone from this host, or unrefreshed for stale_s (a holder on another host, as
    after a requeue), is taken over, and that is said. Returns the function that releases it."""
    me = dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S"))
    for _ in range(2):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
        if not isinstance(held, dict) or not (isinstance(held.get("pid"), int) and 0 < held["pid"] < 2 ** 22):
            held, age = {}, math.inf  # not a lock this code wrote ([], null, a pid no process can have)
        gone = held.get("host") == me["host"] and (held.get("pid") == me["pid"] or not _alive(held.get("pid")))
        if not gone and age < stale_s:
            fail(f"{path} is in use by pid {held.get('pid')} on {held.get('host')} since {held.get('since')} (refreshed "
                 f"{age:.0f} s ago, taken over after {stale_s:g} s): wait for it, stop it, or use another folder")
        print(f"taking over {path}" + (": it holds no lock this code wrote" if not held else
              f" from pid {held['pid']} on {held.get('host')}: " + ("not running" if gone else f"not refreshed for {age:.0f} s")))
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
            time.sleep(stale_s / 4)
            try:
                os.utime(path)
            except OSError:
                return
    atexit.register(release)
    threading.Thread(target=refresh, daemon=True).start()
    return release
