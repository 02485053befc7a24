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
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

# the model card's sampling for long stories, written into every checkpoint's generation_config
CARD_SAMPLING = dict(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)


def base_folder(init_from, out_dir):
    """The folder whose format checkpoints copy: the tiny run's out_dir/base, a local folder, or
    the local copy of a hub id (downloaded once, then from the cache)."""
    if init_from == "tiny":
        return os.path.join(out_dir, "base")
    if os.path.isdir(init_from):
        return init_from
    from huggingface_hub import snapshot_download
    return snapshot_download(init_from)


def policy_class(config):
    """The class the checkpoint names (the hub's Qwen3.5-9B: Qwen3_5ForConditionalGeneration,
    so every tensor keeps its name), or the causal-LM class of a bare text config."""
    import transformers
    arch = (getattr(config, "architectures", None) or [""])[0]
    return getattr(transformers, arch, None) or transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def freeze_vision(model):
    """Stories are text: the vision tower gets no gradients and no optimizer state."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is not None:
        visual.requires_grad_(False)


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


def save(out_dir, step, model, opt, base_dir, state, keep_last, rank=0, world=1):
    """Every rank together: write ckpt_{step}; keep the newest keep_last. Returns '' or, when a
    write failed on any rank (a full disk), why, with the temporary folder removed."""
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
            for old in sorted(glob.glob(os.path.join(out_dir, "ckpt_*")))[:-keep_last]:
                shutil.rmtree(old)
        except Exception as e:  # noqa: BLE001 -- OSError, safetensors' errors
            err = _write_error(e, out_dir)
    err = _first_error(err, world)
    if err and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return err


def restore(ckpt, opt, rank, world):
    """Load every rank's optimizer shard of `ckpt` (memory-mapped: each rank copies only what it
    owns now) and, on the same world size, this rank's RNG states."""
    shards = [torch.load(f, mmap=True, weights_only=False) for f in sorted(glob.glob(os.path.join(ckpt, "optim_rank*.pt")))]
    opt.load_state_dict(shards)
    if len(shards) == world:  # nothing draws from these generators; restored for code that will
        random.setstate(shards[rank]["rng"]["python"])
        np.random.set_state(shards[rank]["rng"]["numpy"])
        torch.set_rng_state(shards[rank]["rng"]["torch"].cpu())


def trim_logs(out_dir, step):
    """Drop the rows of metrics.jsonl and rollouts.jsonl written after the checkpoint of `step`
    (and a half-written last line): both written anew beside the old ones, then swapped in. Returns
    '' or why a write failed (a full disk), with both files as they were."""
    paths = [p for p in (os.path.join(out_dir, n) for n in ("metrics.jsonl", "rollouts.jsonl")) if os.path.exists(p)]
    try:
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as src, open(path + ".tmp", "w") as dst:
                for line in src:
                    try:
                        if json.loads(line)["step"] < step:  # a row's step counts from 0
                            dst.write(line if line.endswith("\n") else line + "\n")
                    except ValueError:
                        pass  # the half-written last line of a run killed during the append
                dst.flush()
                os.fsync(dst.fileno())
    except OSError as e:
        for p in paths:
            if os.path.exists(p + ".tmp"):
                os.remove(p + ".tmp")
        return f"cannot rewrite {path} to drop the rows after step {step}: {e.strerror}"
    for path in paths:
        os.replace(path + ".tmp", path)
    return ""
