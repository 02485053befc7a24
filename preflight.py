"""
The checks that refuse a bad run before its first step, so that a typo costs seconds, not GPU
hours: the settings' ranges and choices, the memory plan, one real judge call, and the ranks'
agreement on what they read. Each raises ValueError naming the setting; train.py prints it in one
line. The data's checks are data.py's, the checkpoint's checkpoint.py's.
"""
import os

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


def check_config(c, world_size, judge_ranges):
    """Ranges, choices and the settings that must agree with each other. Returns the fixed reward
    of the references, or None when the judge scores them (ref_reward='judge')."""
    check_ranges(c, dict(SAMPLING_RANGES, **judge_ranges, **RANGES))
    check_sampling(c["repetition_penalty"], c["presence_penalty"])
    for key, allowed in CHOICES.items():
        if c[key] not in allowed:
            raise ValueError(f"{key}={c[key]!r} must be one of {allowed}")
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ValueError("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment: with torchrun's "
             "store shared, a restarted rank can read the last attempt's addresses and fail to connect (pytorch #135712)")
    if c["eval_interval"] and not c["eval_data"]:
        raise ValueError(f"eval_interval={c['eval_interval']} needs eval_data, held-out rows in train_data's format")
    if c["batch_groups"] % world_size:
        raise ValueError(f"batch_groups={c['batch_groups']} does not divide over {world_size} ranks: each rank owns whole groups")
    if c["n_ref"] not in (0, 1) or c["group_size"] < 2 + c["n_ref"]:
        raise ValueError(f"n_ref={c['n_ref']}, group_size={c['group_size']}: n_ref is 0 or 1 (one human story per prompt), "
             "with at least 2 sampled stories")
    try:
        return None if c["ref_reward"] == "judge" else float(c["ref_reward"])
    except ValueError:
        raise ValueError(f"ref_reward={c['ref_reward']!r} must be 'judge' or a number") from None


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
        raise ValueError(f"the memory plan ({total / 1e9:.1f} GB) does not fit in 90% of {budget / 1e9:.0f} GB per device: "
             "use more ranks or a smaller model")


def probe_judge(judge, rows):
    """One real judge call before the weights load: a rejected key, a wrong URL or model stops here.
    (A signal while it waits ends the run at once: nothing has started.)"""
    if judge:
        probe = judge.submit(rows[0]["prompt"], rows[0]["target_words"], rows[0]["story"]).result()
        if probe["fatal"]:
            raise ValueError(f"the judge cannot be used: {probe['error']}")


def check_ranks(views):
    """views: every rank's (step it resumes from, sha256 of its training data), all-gathered."""
    if len({v[0] for v in views}) > 1:
        raise ValueError(f"the ranks resume from the steps {[v[0] for v in views]}: out_dir must be one folder "
                         "shared by every node")
    if len({v[1] for v in views}) > 1:
        raise ValueError("train_data differs between the nodes (sha256): copy the same file to every node")
