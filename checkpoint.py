"""
Checkpoints, and which one a run continues. out_dir/ckpt_000040/ holds the base folder's files
with the trained tensors swapped into its shards, optim_rank{r}.pt (the fp32 masters and moments
of the parameters rank r owns, its RNG states) and state.pt (the step, the settings, each file's
size). Written under .tmp_ckpt_NNNNNN and renamed when whole. Resume takes the weights from the
fp32 masters, on any world size: each rank takes what it owns now from every old shard.
"""
import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

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
    """The model of the class the config names (the hub's Qwen3.5-9B is a vision-language model:
    every tensor keeps its name; a text config gets its causal-LM class), loaded from `path` or
    built empty, its vision tower frozen: stories are text, so no gradients or optimizer state."""
    import transformers
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None) or transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = cls.from_pretrained(path, dtype=dtype) if path else cls._from_config(config)
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is not None:
        visual.requires_grad_(False)
    return model


def tokenizer_and_config(path):
    """The tokenizer and the model's config of a hub id, a folder or a checkpoint."""
    from transformers import AutoConfig, AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"init_from (or the checkpoint) {path!r}: {e}") from None


def frozen_copy(base_dir, device, dtype):
    """The initial policy, frozen (kl_coef's reference model): a second model's worth of memory."""
    from transformers import AutoConfig
    model = policy(AutoConfig.from_pretrained(base_dir), base_dir, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


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
        raise OSError(f"step {step}: the checkpoint could not be written ({err}); its temporary folder removed. The "
                      f"newest checkpoint is {newest[-1] if newest else 'none'}: free some space and run the same command "
                      "with --resume=auto")


def restore(ckpt, opt, rank, world):
    """Load every rank's optimizer shard of `ckpt` (memory-mapped: each rank copies only what it
    owns now) and, on the same world size, this rank's RNG states."""
    shards = [torch.load(f, mmap=True, weights_only=False) for f in sorted(glob.glob(os.path.join(ckpt, "optim_rank*.pt")))]
    opt.load_state_dict(shards)
    if len(shards) == world:  # nothing draws from these generators; restored for code that will
        random.setstate(shards[rank]["rng"]["python"])
        np.random.set_state(shards[rank]["rng"]["numpy"])
        torch.set_rng_state(shards[rank]["rng"]["torch"].cpu())

# -----------------------------------------------------------------------------
# which checkpoint a run continues, and whether it may


def find(out_dir, resume, resume_from):
    """The checkpoint this run continues, or None for a new run. A new run never mixes into an
    old one; a damaged checkpoint is named with the newest complete one."""
    if not out_dir.strip():
        raise ValueError("out_dir is empty: name the run's folder, e.g. --out_dir=out/run1")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir={out_dir} is a file, not a folder: name another out_dir")
    ckpts = by_step(out_dir)
    logs = any(os.path.exists(os.path.join(out_dir, f)) for f in ("metrics.jsonl", "rollouts.jsonl"))
    if resume is True and not ckpts and not resume_from:
        raise ValueError(f"--resume=True but no checkpoint in {out_dir} (--resume=auto starts a run when there is none)")
    if resume is False and not resume_from and (ckpts or logs):
        raise ValueError(f"out_dir={out_dir} already holds a run (checkpoints or metrics): use --resume=auto to continue "
                         "it, or another out_dir")
    ckpt = resume_from or (ckpts[-1] if resume and ckpts else None)
    bad = ckpt and damaged(ckpt)
    if bad:
        whole = next((c for c in reversed(ckpts) if c != ckpt and not damaged(c)), None)
        raise ValueError(f"cannot resume from {ckpt}: {bad}. " + (f"{whole} is complete: continue from it with "
                         f"--resume_from={whole}" if whole else "No earlier checkpoint is complete: start another out_dir"))
    return ckpt


# the settings that decide the data order and the batch: a resume must keep them
FIXED = ("batch_groups", "group_size", "n_ref", "seed", "train_data_sha256")
# how a run is found and continued, not what it computes: changed freely, and not reported
FREE = ("out_dir", "resume", "resume_from")


def check_resume(ckpt, config, data_sha):
    """Every rank reads the checkpoint's state: the settings in FIXED must be the saved ones; any
    other may change. Returns (state, {setting: [before, now]} for each that changed)."""
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    was = dict(state["config"], train_data_sha256=state["data_sha256"])
    now = dict(config, train_data_sha256=data_sha)
    refused = [f"{k} {was[k]!r} -> {now[k]!r}" for k in FIXED if was[k] != now[k]]
    if refused:
        raise ValueError(f"resume: {ckpt} was written with other settings that decide the data order or the batch: "
                         + "; ".join(refused) + ". Resume with the same ones, or start another out_dir")
    return state, {k: [was[k], v] for k, v in now.items() if k in was and was[k] != v and k not in FREE}


def later_than(out_dir, step):
    """The checkpoints of out_dir after `step`: a run that continues from an older one sets them aside."""
    return [p for p in by_step(out_dir) if step_of(p) > step]


def quiet(device):
    """Silence what cannot apply while models load and generate: on a CPU, Qwen3.5's fast
    linear-attention kernels (CUDA-only) are no news; off a terminal, progress bars are lines of
    carriage returns."""
    import logging
    import sys

    import transformers
    if "cuda" not in device:
        logging.getLogger("transformers.integrations.hub_kernels").addFilter(lambda r: "falling back" not in r.getMessage())
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()
