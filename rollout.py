"""
Everything between the model and the loss, as plain functions: rendering prompts, sampling a
group, the teacher-forced human reference (HRI), collation, chunked per-token log-probabilities,
group advantages and the GRPO loss. train.py strings them together; tests check each alone.

Conventions: sequences are prompt + completion, right-padded; a (B, T-1) loss mask says which
next-token predictions are trained. Masks are always built from lengths, never by comparing
token ids with pad or eos: the pad token may be the eos token.
"""
import json
import os
import shutil

import torch
from transformers import LogitsProcessor, StoppingCriteria

# -----------------------------------------------------------------------------
# prompts and the human reference


def render_prompt(tok, prompt, enable_thinking):
    """The user turn plus the assistant's generation prompt, as token ids."""
    text = tok.apply_chat_template([dict(role="user", content=prompt)], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=enable_thinking)
    return tok(text, add_special_tokens=False).input_ids


def eos_ids(model, tok):
    """Every token id that ends generation (Qwen lists both <|im_end|> and <|endoftext|>)."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids) | {tok.eos_token_id})


def reference_tokens(tok, prompt, story, enable_thinking, eos, mask_think=True):
    """HRI: the exact tokens the policy would have to emit after its generation prompt to write
    `story` as its answer, ending with the end-of-turn token, and their loss mask.

    Template-agnostic: render the whole conversation with the story as the assistant's answer,
    subtract the rendering of the generation prompt (it must be a prefix), and cut after the
    first end-of-turn token after the story (the model never emits the newline the template
    puts after it). With thinking on, what comes before the story is an empty thinking block
    (`\\n</think>\\n\\n` for Qwen). mask_think=True leaves it out of the loss: a human story has no
    thinking, and training that block with a high advantage would teach the policy to stop
    thinking. Returns (prompt_ids, answer_ids, mask) with len(mask) == len(answer_ids)."""
    story = story.strip()  # templates may trim the answer; the human story must be found in it
    user = [dict(role="user", content=prompt)]
    head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking)
    full = tok.apply_chat_template(user + [dict(role="assistant", content=story)], tokenize=False,
                                   enable_thinking=enable_thinking)
    if not full.startswith(head):
        raise ValueError("the chat template's generation prompt is not a prefix of the rendered conversation; "
                         "cannot build the reference answer")
    answer = full[len(head):]
    at = answer.find(story)
    ends = [(answer.find(e, at + len(story)), e) for e in (tok.decode([i]) for i in eos)]
    ends = [(pos, e) for pos, e in ends if pos >= 0]
    if at < 0 or not ends:
        raise ValueError("the rendered conversation does not contain the story followed by an end-of-turn token")
    pos, end = min(ends)
    cut = pos + len(end)
    pre = tok(answer[:at], add_special_tokens=False).input_ids
    body = tok(answer[at:cut], add_special_tokens=False).input_ids
    mask = [0 if mask_think else 1] * len(pre) + [1] * len(body)
    return tok(head, add_special_tokens=False).input_ids, pre + body, mask

# -----------------------------------------------------------------------------
# sampling a group


class PresencePenalty(LogitsProcessor):
    """Subtract `penalty` from the logit of every token already generated (not the prompt's),
    as vLLM and the OpenAI API define presence_penalty."""

    def __init__(self, penalty, prompt_len):
        self.penalty, self.prompt_len = penalty, prompt_len

    def __call__(self, input_ids, scores):
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, input_ids[:, self.prompt_len:], True)
        return scores - self.penalty * seen.to(scores.dtype)


# the allowed values of the sampling settings that train.py and eval.py share (configurator.check_ranges)
SAMPLING_RANGES = dict(max_new_tokens=">= 1", temperature="> 0", top_p="(0, 1]", top_k=">= 0",
                       repetition_penalty="> 0", presence_penalty="[-2, 2]")


def check_sampling(repetition_penalty, presence_penalty):
    """The model card: use either penalty, never both at once."""
    if repetition_penalty != 1.0 and presence_penalty != 0.0:
        raise ValueError(f"repetition_penalty={repetition_penalty} and presence_penalty={presence_penalty}: "
                         "set one of them to neutral (1.0 / 0.0); the model card says never both at once")


def split_thinking(text, enable_thinking, truncated):
    """-> (thinking, story, truncated_in_thinking). The story is the text after the closing
    think tag. With thinking on and no closing tag, everything was thinking: empty story."""
    if "</think>" in text:
        thinking, story = text.split("</think>", 1)
        return thinking.replace("<think>", "").strip(), story.strip(), False
    if enable_thinking:
        return text.replace("<think>", "").strip(), "", truncated
    return "", text.strip(), False


class RowSampler(LogitsProcessor):
    """The last logits processor: draws each row's next token from softmax(scores) with the row's
    own torch.Generator and leaves only that token, which generate(do_sample=False) then picks.
    The distribution is generate's own (the same processor classes in the same order); what
    changes is the randomness: a row's tokens depend on its seed alone, not on which rows share
    the batch, so 1 rank and 4 ranks, or eval in batches of 1 and of 16, sample the same stories.
    It records each drawn token's log-prob under the distribution it was drawn from (after
    penalties, temperature, top-k and top-p): the loss's importance weights need it."""

    def __init__(self, seeds, device):
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.logps = []  # one (B,) tensor per decoding step

    def __call__(self, input_ids, scores):
        logp = scores.float().log_softmax(-1)
        pick = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(logp.exp(), self.gens)])
        self.logps.append(logp.gather(1, pick[:, None])[:, 0].cpu())
        return torch.full_like(scores, -float("inf")).scatter_(1, pick[:, None], 0.0)


class OnFinish(StoppingCriteria):
    """Calls on_done(row, completion_ids) the step a row emits its first eos, so that a finished
    story can go to the judge while longer ones are still decoding. Stops generation only when
    should_stop() says so (the run was asked to stop)."""

    def __init__(self, eos, prompt_len, on_done, should_stop=None):
        self.eos, self.prompt_len, self.on_done, self.should_stop, self.seen = eos, prompt_len, on_done, should_stop, None

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.isin(input_ids[:, -1], torch.tensor(self.eos, device=input_ids.device))
        if self.seen is None:
            self.seen = torch.zeros_like(done)
        for b in (done & ~self.seen).nonzero()[:, 0].tolist():
            self.on_done(b, input_ids[b, self.prompt_len:].tolist())
        self.seen |= done  # rows already finished are padded with pad, which may be an eos id
        return torch.full_like(done, bool(self.should_stop and self.should_stop()))


@torch.no_grad()
def sample(model, tok, prompts, seeds, n, eos, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
           repetition_penalty=1.0, presence_penalty=0.0, enable_thinking=True, on_done=None, should_stop=None):
    """n completions of each prompt (token id lists), all in one generate() call: the prompts are
    left-padded to one length, with the attention mask (Qwen3.5's linear-attention layers honour
    it). Completion j of prompt i is drawn with seed seeds[i] * 1000 + j. Returns, per prompt, n
    samples: completion_ids (through the first eos, or max_new_tokens long when truncated),
    sample_logp (each token's log-prob under the distribution it was drawn from), truncated,
    thinking, story, in_thinking (truncated before the story began). on_done(i, j, sample) is
    called the step completion j of prompt i ends, and after generate() for the truncated ones.
    should_stop() True ends generation early: the unfinished samples come back truncated."""
    check_sampling(repetition_penalty, presence_penalty)
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    T = max(map(len, prompts))
    rows = [p for p in prompts for _ in range(n)]
    x = torch.tensor([[tok.pad_token_id] * (T - len(p)) + p for p in rows], device=model.device)
    attn = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in rows], device=model.device)
    # the order generate() uses when it samples: penalties, temperature, top-k, top-p; then our draw
    procs = [PresencePenalty(presence_penalty, T)] if presence_penalty else []
    procs += [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
    procs += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    sampler = RowSampler([seeds[i] * 1000 + j for i in range(len(prompts)) for j in range(n)], model.device)
    procs += [sampler]
    samples = [None] * len(rows)

    def finish(b, ids):
        stop = next((i for i, t in enumerate(ids) if t in eos), None)
        ids = ids[: stop + 1] if stop is not None else ids[:max_new_tokens]
        text = tok.decode(ids[:-1] if stop is not None else ids, skip_special_tokens=False)
        thinking, story, in_thinking = split_thinking(text, enable_thinking, stop is None)
        samples[b] = dict(completion_ids=ids, truncated=stop is None, thinking=thinking, story=story,
                          in_thinking=in_thinking, sample_logp=torch.stack(sampler.logps[:len(ids)])[:, b].tolist())
        if on_done:
            on_done(b // n, b % n, samples[b])

    out = model.generate(input_ids=x, attention_mask=attn, do_sample=False, max_new_tokens=max_new_tokens,
                         repetition_penalty=repetition_penalty, logits_processor=procs, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id, stopping_criteria=[OnFinish(eos, T, finish, should_stop)])
    for b, row in enumerate(out[:, T:].tolist()):
        if samples[b] is None:  # truncated at max_new_tokens
            finish(b, row)
    return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]


# -----------------------------------------------------------------------------
# collation and log-probabilities


def collate(seqs, pad_id):
    """seqs: [(prompt_ids, completion_ids, completion_mask)] -> input_ids, attention_mask (B, T)
    and loss_mask (B, T-1) over next-token targets: 1 where completion_mask is 1."""
    T = max(len(p) + len(c) for p, c, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), T, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), T - 1)
    for b, (p, c, m) in enumerate(seqs):
        n = len(p) + len(c)
        ids[b, :n] = torch.tensor(p + c)
        attn[b, :n] = 1
        # target at position t is ids[t + 1]: completion token j sits at len(p) + j
        loss_mask[b, len(p) - 1: n - 1] = torch.tensor(m, dtype=torch.float)
    return ids, attn, loss_mask


def _softmax_(x):
    """Row-wise softmax that overwrites x and returns logsumexp(x): one (c, V) buffer, no copy."""
    mx = x.max(-1, keepdim=True).values
    total = x.sub_(mx).exp_().sum(-1, keepdim=True)
    x.div_(total)
    return (total.log_() + mx)[:, 0]


class ChunkedLogProb(torch.autograd.Function):
    """log softmax(h @ W.T / T)[target] for N rows, chunk rows at a time, recomputing the
    logits in backward: peak extra memory is one chunk x V float buffer instead of several
    N x V ones (at 8,192 tokens and V = 248,320 the full logits alone are 8 GB in fp32, and
    log_softmax, its backward and the gradient each add as much). Also returns each row's
    entropy -sum(p log p) at the same temperature, a metric without gradient.

    The gradient, for z = h @ W.T / T, p = softmax(z) and logp = z[target] - logsumexp(z):
        d logp / d z = onehot(target) - p                     (c, V), built in place over p
        d logp / d h = (onehot - p) @ W / T,   d logp / d W = (onehot - p).T @ h / T
    each row scaled by the incoming gradient g, and the chunks' W-gradients summed."""

    @staticmethod
    def forward(ctx, h, W, targets, temperature, chunk):  # h (N, H), W (V, H), targets (N,)
        out = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        ent = torch.empty_like(out)
        for i in range(0, h.shape[0], chunk):
            logits = (h[i:i + chunk] @ W.T).float().div_(temperature)  # (c, V)
            target = logits.gather(1, targets[i:i + chunk, None])[:, 0]
            out[i:i + chunk] = target - _softmax_(logits)  # logits now holds the probabilities p
            for j in range(0, len(logits), 128):  # entr(p) = -p log p, 128 rows at a time: no second (c, V) buffer
                e = torch.special.entr(logits[j:j + 128]).sum(-1)
                ent[i + j:i + j + len(e)] = e
            del logits  # free it before the next chunk's matmul, or two buffers coexist
        ctx.save_for_backward(h, W, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, g, _):  # g (N,); the entropy has no gradient
        h, W, targets = ctx.saved_tensors
        gh, gW = torch.zeros_like(h), torch.zeros_like(W)
        for i in range(0, h.shape[0], ctx.chunk):
            hc, tc, gc = h[i:i + ctx.chunk], targets[i:i + ctx.chunk], g[i:i + ctx.chunk] / ctx.temperature
            gl = (hc @ W.T).float().div_(ctx.temperature)  # (c, V), recomputed
            _softmax_(gl)
            gl.mul_(-gc[:, None])  # g (onehot - p) / T, in place
            gl[torch.arange(len(tc), device=gl.device), tc] += gc
            gl = gl.to(h.dtype)
            gh[i:i + ctx.chunk] = gl @ W
            gW.addmm_(gl.T, hc)  # accumulated in W's dtype
            del gl
        return gh, gW, None, None, None


def token_logprobs(model, input_ids, attention_mask, loss_mask, temperature=1.0, chunk=1024):
    """(B, T-1) log-probabilities of each next token, and the entropy of each next-token
    distribution, computed only where loss_mask is set (zeros elsewhere).

    At the sampling temperature: the stories were drawn from softmax(logits / T), so that is the
    policy whose log-probs the policy gradient needs (TRL does the same); at T = 0.6 the untempered
    log-probs would describe a different, flatter policy than the one that acted.
    Through model.model and the LM head's weight, not model(...): the model's own forward would
    build the full (B, T, V) logits; the body's last hidden states and get_output_embeddings()
    (lm_head, or the input embedding when they are tied) let ChunkedLogProb do it chunk by chunk."""
    h = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    sel = loss_mask.bool()
    logp, ent = ChunkedLogProb.apply(h[:, :-1][sel], model.get_output_embeddings().weight,
                                     input_ids[:, 1:][sel], temperature, chunk)
    zeros = torch.zeros(loss_mask.shape, device=h.device, dtype=torch.float32)
    return zeros.masked_scatter(sel, logp), zeros.masked_scatter(sel, ent)

# -----------------------------------------------------------------------------
# advantages and loss


def group_advantages(R, scale_rewards="group", eps=1e-4):
    """R (G,) rewards of one group, reference included -> advantages (G,).
    NaN rewards (the judge failed) are left out of the mean and std and get advantage 0.
    scale_rewards='group': (R - mean) / (std + eps); 'none': R - mean (Dr. GRPO).
    Returns (A, zero_std) where zero_std says the group carries no signal."""
    ok = ~torch.isnan(R)
    A = torch.zeros_like(R)
    if ok.sum() < 2:
        return A, True
    r = R[ok]
    std = r.std(unbiased=False)  # population std, as in TRL
    A[ok] = r - r.mean()
    if scale_rewards == "group":
        A[ok] = A[ok] / (std + eps)
    return A, bool(std < 1e-8)


def grpo_loss(logp, old_logp, adv, mask, loss_norm, denom, eps_low=0.2, eps_high=0.28, ref_logp=None, kl_coef=0.0,
              shaped=None, gamma=0.0, is_weight=None):
    """The clipped policy-gradient loss of one micro-batch, per sequence: (B,), summed by the
    caller, so that the sampled stories' part and the references' part can be told apart.
    logp, old_logp, mask (B, T); adv (B,).

    On-policy with one update per batch, old_logp = logp.detach(): the ratio is exactly 1,
    clipping never acts and the gradient is -A * grad(log p). `denom` is global, counted over
    every rank and micro-batch, so that summing micro-batches and all-reducing gradients gives
    exactly the batch loss. loss_norm decides how much a sequence counts:
      'token'    -> sum over all tokens / total trained tokens: every token counts alike, so a
                    long story weighs more (DAPO, Yu et al. 2025; TRL's default);
      'seq'      -> each sequence's mean over its tokens, / number of sequences: every story
                    counts alike, so each token of a long story counts less (the original GRPO,
                    Shao et al. 2024; Dr. GRPO showed this biases towards long wrong answers);
      'constant' -> sum over all tokens / (sequences x max_new_tokens): no length normalisation
                    at all (Dr. GRPO, Liu et al. 2025).

    shaped (B,) bool and gamma > 0: LUFFY's policy shaping for the teacher-forced references:
    their tokens' term is -A * f(p) with f(p) = p / (p + gamma), p = exp(logp), in place of the
    ratio. Its gradient is -A * gamma / (p + gamma)^2 * grad p = -A * [gamma p / (p + gamma)^2]
    * grad log p: tokens the policy already finds likely (p >> gamma) are damped, so the human
    story no longer dominates by imitation, and the weight stays bounded as p -> 0.

    is_weight (B, T), detached: each token's truncated importance weight min(pi_old / pi_sample,
    tis_cap) for the sampler's mismatch (penalties, top-k, top-p), 1 where it does not apply."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_tok = -torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if is_weight is not None:
        per_tok = per_tok * is_weight
    if gamma and shaped is not None and shaped.any():
        p = torch.exp(logp)
        per_tok = torch.where(shaped[:, None], -a * p / (p + gamma), per_tok)
    if kl_coef:
        d = ref_logp - logp  # k3 estimator of KL(pi || pi_ref), always >= 0
        per_tok = per_tok + kl_coef * (torch.exp(d) - d - 1)
    per_seq = (per_tok * mask).sum(1)
    if loss_norm == "seq":
        per_seq = per_seq / mask.sum(1).clamp(min=1)
    return per_seq / denom


# -----------------------------------------------------------------------------
# memory plan and the tiny model


def micro_batches(lengths, budget):
    """Indices of sequences grouped into micro-batches: sorted by length, each micro-batch as
    many as fit in `budget` tokens counting padding (count x longest); a sequence longer than the
    budget goes alone. Similar lengths together waste little padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    out = [[]]
    for i in order:
        if out[-1] and (len(out[-1]) + 1) * lengths[i] > budget:
            out.append([])
        out[-1].append(i)
    return out


def activation_bytes(config, tokens, logprob_chunk, checkpointing, param_bytes):
    """A rough peak for one micro-batch of `tokens` padded tokens: with checkpointing each layer
    keeps only its input (hidden x param_bytes a token) and one layer at a time is recomputed
    (~34 x hidden bytes a token, Korthikanti et al. 2022); without, every layer keeps its ~34 x
    hidden. Plus the chunked log-prob buffer and its gradient (2 x chunk x vocab x 4 bytes)."""
    c = config.get_text_config()
    per_token = (c.num_hidden_layers * c.hidden_size * param_bytes + 34 * c.hidden_size if checkpointing
                 else c.num_hidden_layers * 34 * c.hidden_size)
    return tokens * per_token + 2 * logprob_chunk * c.vocab_size * 4


def memory_plan(n_params, world_size, param_bytes, n_trainable=None, activations=0):
    """Per-GPU bytes with optim.ShardedAdamW: weights replicated; the fp32 gradient sum (4 bytes)
    and AdamW's fp32 master weights and two moments (12 bytes) of the trainable parameters split
    over the ranks. Frozen parameters (the 9B's vision tower) count as weights only. Then one
    micro-batch's activations (activation_bytes). The bf16 gradients of the layer backward is
    working on come on top, freed as soon as they reach their owner."""
    n_trainable = n_params if n_trainable is None else n_trainable
    return dict(weights=n_params * param_bytes, grads=4 * n_trainable / world_size,
                optimizer=12 * n_trainable / world_size, activations=activations)


# -----------------------------------------------------------------------------
# the policy's class and checkpoints in the base's own format

# the model card's sampling for long stories, written into every checkpoint's generation_config
CARD_SAMPLING = dict(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)


def policy_class(config):
    """The class the checkpoint names. The hub's Qwen3.5-9B is Qwen3_5ForConditionalGeneration
    (a vision-language model): loading it as such keeps every tensor name of the base, so that
    checkpoints are written in exactly its format; freeze_vision keeps its vision tower out of
    training. A config that names no class (a bare text config) gets its causal-LM class."""
    import transformers
    arch = (getattr(config, "architectures", None) or [""])[0]
    return getattr(transformers, arch, None) or transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def freeze_vision(model):
    """Stories are text: the vision tower gets no gradients and no optimizer state."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is not None:
        visual.requires_grad_(False)


def save_like_base(model, base_dir, out_dir):
    """Write `model` in the exact format of the checkpoint folder `base_dir`: every file of the
    base is copied, and in its safetensors shards each trained tensor is swapped in, cast to the
    base's dtype. Everything else (the frozen vision tower, the mtp head that transformers skips
    on load) stays byte for byte the base's, with the same names, shapes, shards and index, so a
    checkpoint loads and serves exactly like the base. Its generation_config samples with the
    model card's settings: servers that read it (transformers serve) decode greedily otherwise."""
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


def damaged_checkpoint(path):
    """Why the checkpoint folder `path` cannot be resumed from, or '' when it is complete: its
    state.pt must load and list every file with its size (a cut write leaves a shorter file)."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    except Exception as e:  # noqa: BLE001 -- missing, truncated or not ours: each says why
        return f"{os.path.join(path, 'state.pt')} cannot be read ({type(e).__name__}: {str(e)[:200]})"
    for f, size in state.get("files", {}).items():  # checkpoints written before the list was kept: not checked
        p = os.path.join(path, f)
        if not os.path.exists(p):
            return f"{p} is missing"
        if os.path.getsize(p) != size:
            return f"{p} is truncated or changed ({os.path.getsize(p):,} bytes, written as {size:,})"
    return ""


# Qwen3.5's chat format, as its published template renders a conversation: a user turn; an
# assistant turn after the last user turn with its thinking block (empty when there was none;
# text before </think> in the content is moved into it); the generation prompt, which ends in
# '<think>\n' with thinking on and in an empty, closed block with thinking off.
CHAT_TEMPLATE = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'assistant' %}
{%- set content = m.content %}
{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}
{%- if m.reasoning_content is not string and '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_user %}
{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
{%- else %}
{{- '<|im_start|>assistant\n' + content }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}
{%- else %}{{- '<think>\n' }}{%- endif %}
{%- endif %}"""


def build_tiny(data_files, vocab_size=1024, hidden=64, layers=4, seed=0):
    """A tiny Qwen3.5-architecture model (3 linear-attention layers to 1 full-attention layer,
    like the 9B) with random weights, and a byte-level BPE tokenizer trained on the project's
    own text with a Qwen-style chat template. Nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3_5TextConfig
    texts = []
    for path in data_files:
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            texts += [row["prompt"], row["story"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    heads = max(1, hidden // 16)
    config = Qwen3_5TextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=16,
        linear_num_key_heads=max(1, heads // 2), linear_num_value_heads=heads, linear_key_head_dim=16,
        linear_value_head_dim=16, max_position_embeddings=8192, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32), tok
