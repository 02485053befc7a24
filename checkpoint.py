"""
Checkpoints: the model in its base's own format, every rank's optimizer shard, and what resume
needs (the step, the settings that decide the batch, each file's size).

    out_dir/ckpt_000040/   the base folder's files, trained tensors swapped into its shards,
                           optim_rank{r}.pt (fp32 master weights and moments of the parameters
                           rank r owns, its RNG states) and state.pt

A checkpoint is written under .tmp_ckpt_NNNNNN and renamed when whole, so a kill never leaves a
damaged ckpt_*. Resume takes the weights from the fp32 masters (the checkpoint's weights may be
rounded to the base's bf16) and may run on another world size: each rank takes the parameters it
owns in the new layout from every old shard.
"""
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import jsonl
import rubric

# the model card's sampling for long stories, written into every checkpoint's generation_config
CARD_SAMPLING = dict(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)


def save_tiny_base(model, tok, base_dir):
    """The tiny run's base model, written whole or not at all (beside, then renamed)."""
    tmp = base_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(base_dir, ignore_errors=True)
    os.rename(tmp, base_dir)


def base_folder(init_from, out_dir):
    """The folder whose format checkpoints copy: the tiny run's out_dir/base, a local folder, or
    the local copy of a hub id (downloaded once, then from the cache)."""
    if init_from == "tiny":
        return os.path.join(out_dir, "base")
    if os.path.isdir(init_from):
        return init_from
    from huggingface_hub import snapshot_download
    return snapshot_download(init_from)


def policy(config, path=None, dtype=None):
    """The model of the class the config names (the hub's Qwen3.5-9B is Qwen3_5ForConditionalGeneration,
    so every tensor keeps its name; a bare text config gets its causal-LM class), loaded from `path`
    or built empty, with its vision tower frozen: stories are text, so no gradients or optimizer state."""
    import transformers
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None) or transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = cls.from_pretrained(path, dtype=dtype) if path else cls._from_config(config)
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is not None:
        visual.requires_grad_(False)
    return model


def save_like_base(model, base_dir, out_dir):
    """Write `model` in the exact format of the folder `base_dir`: every file copied, and in its
    safetensors shards each trained tensor swapped in, cast to the base's dtype. The vision tower
    and the mtp head stay byte for byte the base's, so a checkpoint loads and serves like the base;
    its generation_config samples with the card's settings (servers decode greedily otherwise)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    placed = set()
    os.makedirs(out_dir, exist_ok=True)
    for f in sorted(os.listdir(base_dir)):
        src, dst = os.path.join(base_dir, f), os.path.join(out_dir, f)
        if not os.path.isfile(src) or f == "state.pt" or f.startswith("optim_rank"):
            continue  # a resumed base's training state is not part of the model
        if not f.endswith(".safetensors"):
            shutil.copy(src, dst)  # config, index, tokenizer, chat template, processor configs, ...
            continue
        tensors = {}
        with safe_open(src, "pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                # a text-only class names 'model.language_model.X' of the hub's files 'model.X'
                name = next((n for n in (k, k.replace("model.language_model.", "model.", 1)) if n in trained), None)
                if name:
                    t = trained[name].detach().to("cpu", t.dtype).clone()
                    placed.add(name)
                tensors[k] = t
            save_file(tensors, dst, metadata=sf.metadata())
    if set(trained) - placed:
        raise RuntimeError(f"{base_dir} has no tensor for {sorted(set(trained) - placed)[:3]}: not the base of this model")
    path = os.path.join(out_dir, "generation_config.json")
    gen = json.load(open(path)) if os.path.exists(path) else {}
    with open(path, "w") as fh:
        json.dump(dict(gen, **CARD_SAMPLING), fh, indent=2)


def damaged(path):
    """Why the checkpoint folder `path` cannot be resumed from, or '' when it is whole: its
    state.pt must load and list every file with its size (a cut write leaves a shorter file)."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    except Exception as e:  # noqa: BLE001 -- missing, truncated or not ours: each says why
        return f"{os.path.join(path, 'state.pt')} cannot be read ({type(e).__name__}: {str(e)[:200]})"
    for f, size in state.get("files", {}).items():
        p = os.path.join(path, f)
        if not os.path.exists(p):
            return f"{p} is missing"
        if os.path.getsize(p) != size:
            return f"{p} is truncated or changed ({os.path.getsize(p):,} bytes, written as {size:,})"
    return ""


def by_step(out_dir):
    """The checkpoint folders of out_dir, oldest first, by the step in their name (ckpt_000040)."""
    found = [(int(m[1]), p) for p in glob.glob(os.path.join(out_dir, "ckpt_*"))
             if (m := re.fullmatch(r"ckpt_(\d+)", os.path.basename(p)))]
    return [p for _, p in sorted(found)]


def step_of(path):
    return int(os.path.basename(path.rstrip("/"))[len("ckpt_"):])


def prune(out_dir, keep_last, resumed):
    """Remove old checkpoints: keep the newest keep_last complete ones, and the one the run resumed
    from (step `resumed`) until keep_last complete ones are newer. A damaged one never counts, and
    nothing newer than the newest complete one is removed."""
    ckpts = by_step(out_dir)
    complete = [p for p in ckpts if not damaged(p)]
    keep = set(complete[-keep_last:])
    if sum(step_of(p) > resumed for p in complete) < keep_last:
        keep |= {p for p in complete if step_of(p) == resumed}
    for p in ckpts:
        if p not in keep and step_of(p) < step_of(complete[-1]):
            shutil.rmtree(p)


def _first_error(err, world):
    """Every rank learns the first error any rank had ('' when none)."""
    errs = [err]
    if world > 1:
        errs = [None] * world
        dist.all_gather_object(errs, err)
    return next((e for e in errs if e), "")


def _write_error(e, out_dir):
    """Why a write failed, in words: torch's zip writer reports a full disk as 'unexpected pos'."""
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    free = shutil.disk_usage(out_dir).free
    return why if "No space" in why or free > 2 ** 20 else f"No space left on device, {free:,} bytes free ({why})"


def save(out_dir, step, model, opt, base_dir, state, keep_last, resumed=0, rank=0, world=1):
    """Every rank together: write ckpt_{step}, then prune (keep_last, and the checkpoint of step
    `resumed` that the run continued from). A write that fails on any rank (a full disk) removes
    the temporary folder and stops the run, saying why."""
    final, tmp = os.path.join(out_dir, f"ckpt_{step:06d}"), os.path.join(out_dir, f".tmp_ckpt_{step:06d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world > 1:
        dist.barrier()
    err = ""
    try:
        rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
        with open(os.path.join(tmp, f"optim_rank{rank}.pt"), "wb") as f:  # a file object: OSError names the cause
            torch.save(dict(opt.state_dict(), rng=rng), f)
    except Exception as e:  # noqa: BLE001 -- OSError, or torch's own writer's errors
        err = f"rank {rank}: {_write_error(e, out_dir)}"
    err = _first_error(err, world)
    if rank == 0 and not err:
        try:
            save_like_base(model, base_dir, tmp)
            files = {f: os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)}
            with open(os.path.join(tmp, "state.pt"), "wb") as f:
                torch.save(dict(state, step=step, files=files), f)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            prune(out_dir, keep_last, resumed)
        except Exception as e:  # noqa: BLE001 -- OSError, safetensors' errors
            err = _write_error(e, out_dir)
    err = _first_error(err, world)
    if err:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        newest = by_step(out_dir)
        sys.exit(f"error: step {step}: the checkpoint could not be written ({err}); its temporary folder removed. The "
                 f"newest checkpoint is {newest[-1] if newest else 'none'}: free some space and run the same command "
                 "with --resume=auto")


def restore(ckpt, step, opt, rank, world, out_dir):
    """Load every rank's optimizer shard of `ckpt` (memory-mapped: each rank copies only what it
    owns now) and, on the same world size, this rank's RNG states; the master drops the logs' rows
    written after the checkpoint, or stops with the logs untouched when it cannot (a full disk)."""
    shards = [torch.load(f, mmap=True, weights_only=False) for f in sorted(glob.glob(os.path.join(ckpt, "optim_rank*.pt")))]
    opt.load_state_dict(shards)
    if len(shards) == world:  # nothing draws from these generators; restored for code that will
        random.setstate(shards[rank]["rng"]["python"])
        np.random.set_state(shards[rank]["rng"]["numpy"])
        torch.set_rng_state(shards[rank]["rng"]["torch"].cpu())
    err = rank == 0 and trim_logs(out_dir, step)
    if err:
        sys.exit(f"error: {err}; the logs are unchanged. Free some space and run the same command again")


LOGS = ("metrics.jsonl", "rollouts.jsonl", "evals.jsonl")  # rows with a step, trimmed on resume


def trim_logs(out_dir, step):
    """Drop the rows of the logs written after the checkpoint of `step` (and a half-written last
    line): each written anew beside the old one, then swapped in. When the run continues from an
    older checkpoint than its newest (--resume_from), nothing is dropped: the later checkpoints and
    the later rows are moved into out_dir/abandoned_TIME/, and that is said. A run folder from before
    run.json counted steps from 0: its rows are renumbered from 1 on the way. Returns '' or why a
    write failed (a full disk), with every file as it was."""
    paths = [p for p in (os.path.join(out_dir, n) for n in LOGS) if os.path.exists(p)]
    later = [p for p in by_step(out_dir) if step_of(p) > step]
    aside = os.path.join(out_dir, f"abandoned_{time.strftime('%Y%m%d-%H%M%S')}") if later else None
    shift = 0 if os.path.exists(os.path.join(out_dir, "run.json")) else 1
    try:
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as src, open(path + ".tmp", "w") as dst, \
                    open(path + ".later", "w") as rest:
                for line in src:
                    try:
                        row = json.loads(line)
                        keep = row["step"] + shift <= step
                        (dst if keep else rest).write(json.dumps(dict(row, step=row["step"] + shift)) + "\n" if shift
                                                      else line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError, TypeError):
                        pass  # the half-written last line of a run killed during the append
                for f in (dst, rest):
                    f.flush()
                    os.fsync(f.fileno())
    except OSError as e:
        for p in paths:
            for tmp in (p + ".tmp", p + ".later"):
                if os.path.exists(tmp):
                    os.remove(tmp)
        return f"cannot rewrite {path} to drop the rows after step {step}: {e.strerror}"
    if aside:  # continuing from an older checkpoint: what came after it is kept, out of the run's way
        os.makedirs(aside)
        for p in later:
            os.rename(p, os.path.join(aside, os.path.basename(p)))
    for path in paths:
        if aside:
            os.rename(path + ".later", os.path.join(aside, os.path.basename(path)))
        else:
            os.remove(path + ".later")
        os.replace(path + ".tmp", path)
    if aside:
        print(f"continuing from step {step}, older than the newest checkpoint: "
              f"{', '.join(os.path.basename(p) for p in later)} and the log rows after step {step} moved to {aside}")
    if shift:  # renumbered: prepare() writes run.json in full, this says so should the run stop before it
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump({}, f)
    return ""


def prepare(out_dir, state, config, world_size, changed=None):
    """Before the first step, on the master: remove a checkpoint whose writer was killed, and for a
    new run in a folder with logs but no checkpoint (resume='auto' after a run killed before its
    first save) move the old logs aside, never mixing them with the new. Write run.json: the run's
    id, the settings of its first start, and one entry per start (its step, world size and the
    settings changed on resume); its presence says that the logs count steps from 1. Returns the run's id."""
    for tmp in glob.glob(os.path.join(out_dir, ".tmp_ckpt_*")):
        shutil.rmtree(tmp)
    logs = [f for f in LOGS + ("references.jsonl", "run.json") if os.path.exists(os.path.join(out_dir, f))]
    if not state and logs:
        aside = os.path.join(out_dir, f"abandoned_{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(aside)
        for f in logs:
            os.rename(os.path.join(out_dir, f), os.path.join(aside, f))
        print(f"{out_dir} held logs but no checkpoint: starting over, the old logs moved to {aside}")
    try:
        old = json.load(open(os.path.join(out_dir, "run.json"))) if state else {}
    except (OSError, ValueError):
        old = {}
    run_id = state.get("run_id") or f"{time.strftime('%Y%m%d%H%M%S')}{random.Random().randrange(16 ** 6):06x}"
    start = dict(time=time.strftime("%Y-%m-%d %H:%M:%S"), step=state.get("step", 0), world_size=world_size,
                 changed=changed or {})
    jsonl.write_json(os.path.join(out_dir, "run.json"), dict(run_id=run_id, config=old.get("config") or config,
                                                           starts=old.get("starts", []) + [start]))
    return run_id


def next_commands(out_dir, final, base, enable_thinking, tiny, max_new_tokens):
    """What to run after training, as it can be copied: stories from the final checkpoint and from
    its base, into out_dir's sibling eval/ folder, named for the run. The checkpoint tells
    generation whether it thinks; the base needs it said. The tiny run writes no longer stories
    than it trained on, for 60 prompts: a few minutes on a CPU."""
    name, folder = os.path.basename(os.path.normpath(out_dir)), os.path.join(os.path.dirname(os.path.normpath(out_dir)), "eval")
    small = f" --max_new_tokens={max_new_tokens} --limit=60" if tiny else ""
    return (f"next: stories of the final checkpoint and of its base for {'60' if tiny else 'the 180'} evaluation prompts "
            f"(docs/evaluation.md):\n"
            f"  python eval.py --task=generate --model={final} --name={name} --out={folder}/{name}.jsonl{small}\n"
            f"  python eval.py --task=generate --model={base} --name={name}-base --out={folder}/{name}-base.jsonl{small}"
            + ("" if enable_thinking else " --enable_thinking=False"))


def config_in_force(run):
    """A run.json's settings as its latest start ran them: the first start's, with each resume's changes."""
    config = dict(run.get("config") or {})
    for start in run.get("starts", []):
        config.update({k: now for k, (_, now) in start.get("changed", {}).items()})
    return config


# -----------------------------------------------------------------------------
# stopping at a safe point: SIGTERM (a cluster's preemption), Ctrl-C, a peer that died


def watch(run, ddp, dist_timeout_s):
    """SIGTERM or SIGINT while run['phase'] is 'starting' ends the run at once (run['release']()
    frees its lock; nothing is written before the logs are prepared). Later, it puts its name in
    run['stop']: the loop stops at its next safe point and checkpoints the last completed step; a
    second signal exits at once (a checkpoint being written stays a .tmp_ folder). A collective that failed (a peer died, or one waited dist_timeout_s for a
    stuck one) ends the run with one line naming the step, not gloo's or nccl's traceback."""
    def on_signal(signum, frame):
        if run["phase"] == "starting":  # nothing to save yet: end now, whatever the start-up is doing
            print(f"\nerror: stopped by {signal.Signals(signum).name} while starting, before any step. Start it again "
                  f"with:\n  {run['again']}", file=sys.stderr, flush=True)
            run["release"]()
            os._exit(1)
        if run["stop"]:
            os._exit(128 + signum)
        run["stop"].append(signal.Signals(signum).name)
        print(f"\n{run['stop'][0]} while {run['phase']}: stopping at the next safe point; a second signal exits "
              "at once", file=sys.stderr, flush=True)

    def on_error(kind, e, tb):
        if ddp and isinstance(e, RuntimeError) and any(w in str(e) for w in ("gloo", "NCCL", "Connection", "imed out")):
            where = f"step {run['step']}" if run["step"] else "start-up"
            print(f"error: {where}: a collective with the other ranks failed: {str(e).splitlines()[0][:300]}. A rank "
                  f"died, or waited dist_timeout_s={dist_timeout_s:g} for a stuck one; the newest checkpoint continues "
                  "the run (--resume=auto)", file=sys.stderr, flush=True)
        else:
            sys.__excepthook__(kind, e, tb)
    sys.excepthook = on_error
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

# -----------------------------------------------------------------------------
# the run's logs: one row a step in metrics.jsonl, every story in rollouts.jsonl, the step line


def log_step(out_dir, step, max_steps, groups, ids, acc, stopping, held=None, rank=0, world=1, wandb=None):
    """Reduce a step's metrics over the ranks ([sum, count] pairs for the means, plain sums for
    the totals, one all_reduce each), print the step line, append metrics.jsonl and rollouts.jsonl
    on the master. groups: this rank's lists of Stories; ids: their (group, data row); held: the
    step's held-out metrics, when it was evaluated. rollouts.jsonl has a row a story, the group's
    prompt on its first, the judge's reply on each; a human reference's text goes once per run to
    references.jsonl, its rows name it by id. Returns the metrics, and whether any rank was asked to stop."""
    rolls = [s for g in groups for s in g if not s.is_ref]
    refs = [s for g in groups for s in g if s.is_ref and not math.isnan(s.judged["reward"])]

    def pair(values):  # NaN (a failed judgement) counts nowhere
        v = [x for x in values if not math.isnan(x)]
        return [sum(v), len(v)]
    means = dict(reward=pair(s.judged["reward"] for s in rolls), ref_reward=pair(s.judged["reward"] for s in refs),
                 sq=pair(s.judged["sq"] for s in rolls), length_ratio=pair(s.judged["ratio"] for s in rolls),
                 truncated=pair(s.truncated for s in rolls), truncated_in_thinking=pair(s.in_thinking for s in rolls),
                 ref_nll=[acc["ref_nll"], acc["ref_tok"]], entropy=[acc["ent_sum"], acc["ent_tok"]],
                 ref_adv=pair(s.adv for s in refs), ref_adv_neg=pair(float(s.adv < 0) for s in refs),
                 ref_rank=pair(1.0 + sum(s.judged["reward"] > r.judged["reward"] for s in g)  # 1: the group's best
                               for g in groups for r in g if r.is_ref and not math.isnan(r.judged["reward"])),
                 is_ratio_mean=[acc["is_sum"], acc["is_tok"]] if acc["is_tok"] else [1.0, 1.0],
                 is_clipped_frac=[acc["is_clip"], acc["is_tok"]] if acc["is_tok"] else [0.0, 1.0])
    stories = [s for g in groups for s in g]
    totals = dict(zero_std_groups=acc["zero_std"], idle_passes=acc["idle"], stop=stopping,
                  judge_failures=sum(s.judged["error"] is not None for s in stories),
                  judge_tokens=sum(s.judged["tokens_in"] + s.judged["tokens_out"] for s in stories),
                  judge_cost=sum(s.judged["cost"] for s in stories), loss_on=acc["loss_on"], loss_off=acc["loss_off"],
                  gen_tokens=sum(len(s.completion_ids) for s in rolls), train_tokens=acc["train_tokens"],
                  **{k: acc[k] for k in ("t_generate", "t_judge_wait", "t_train", "t_sync", "t_checkpoint")})
    pairs = torch.tensor(list(means.values()), dtype=torch.float64)  # (M, 2)
    sums = torch.tensor(list(totals.values()), dtype=torch.float64)  # (S,)
    if world > 1:
        dist.all_reduce(pairs)
        dist.all_reduce(sums)
    m = {k: s / n if n else math.nan for k, (s, n) in zip(means, pairs.tolist())}
    m.update(zip(totals, sums.tolist()))
    stopping = m.pop("stop") > 0
    m["loss"] = m["loss_on"] + m["loss_off"]
    if not any(s.is_ref for s in stories):
        m["loss_off"] = math.nan  # no references: the loss is the sampled stories' alone
    for k in ("t_generate", "t_judge_wait", "t_train", "t_sync", "t_checkpoint"):
        m[k] /= world  # mean seconds per rank
    m.update(step=step, t_step=time.time() - acc["t0"], grad_norm=acc["grad_norm"], skipped=acc["skipped"], lr=acc["lr"],
             gen_tok_per_s=m["gen_tokens"] / max(m["t_generate"] * world, 1e-9),
             train_tok_per_s=m["train_tokens"] / max(m["t_train"] * world, 1e-9), **(held or {}))
    records = [dict(step=step, group=gid, id=row["id"], **(dict(prompt=row["prompt"], target_words=row["target_words"])
                                                           if j == 0 else {}),
                    is_ref=s.is_ref, story=None if s.is_ref else s.text, thinking_words=rubric.count_words(s.thinking),
                    truncated=s.truncated, adv=s.adv, judge_reply=s.judged["reply"],
                    **{k: s.judged[k] for k in ("reward", "sq", "ratio", "scores", "error")})
               for (gid, row), g in zip(ids, groups) for j, s in enumerate(g)]
    references = [dict(id=row["id"], prompt=row["prompt"], target_words=row["target_words"], story=row["story"])
                  for (_, row), g in zip(ids, groups) if any(s.is_ref for s in g)]
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object((records, references), gathered, dst=0)
        records, references = ([r for part in (gathered or []) for r in part[k]] for k in (0, 1))
    if rank == 0:  # what a person watches; everything else is in metrics.jsonl (docs/training.md)
        print(f"step {step}/{max_steps} | reward {m['reward']:.1f} (ref {m['ref_reward']:.1f}) | sq {m['sq']:.1f} | "
              f"len {m['length_ratio']:.2f} | entropy {m['entropy']:.2f} | gnorm {m['grad_norm']:.2f}"
              + (" SKIPPED" if m["skipped"] else "") + (f" | judge fail {m['judge_failures']:.0f}" if m["judge_failures"]
                                                        else "") + (heldout_line(m) if held else "")
              + f" | ${m['judge_cost']:.2f} | {m['t_step']:.0f}s", flush=True)
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")
        with open(os.path.join(out_dir, "rollouts.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        new_references(out_dir, references)
        if wandb:
            wandb.log(m, step=step)  # a wandb Run
    return m, stopping


def heldout_line(m):
    return f" | heldout sq {m['heldout_sq']:.1f} (n {m['heldout_n']})"


_written = {}  # out_dir -> the ids in its references.jsonl


def new_references(out_dir, references):
    """Append the human references that references.jsonl does not hold yet: each once per run."""
    path = os.path.join(out_dir, "references.jsonl")
    if out_dir not in _written:  # once a run: what is there, less a line half-written when a run was killed
        lines = open(path, encoding="utf-8").read().split("\n") if os.path.exists(path) else []
        whole = [line for line in lines[:-1] if line]
        if lines and lines[-1]:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in whole)
            os.replace(path + ".tmp", path)
        _written[out_dir] = {json.loads(line)["id"] for line in whole}
    new = [r for r in {r["id"]: r for r in references}.values() if r["id"] not in _written[out_dir]]
    if new:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
        _written[out_dir] |= {r["id"] for r in new}
