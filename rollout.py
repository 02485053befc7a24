"""
Everything between the model and the loss, as plain functions: a group's stories (sampled, and
the teacher-forced human reference), collation, chunked log-probs, advantages, the GRPO loss.
Sequences are prompt + completion, right-padded; a (B, T-1) `mask` says which next-token
predictions are trained, built from lengths, never from token ids (pad may equal eos).
Derivations: docs/code.md.
"""
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, StoppingCriteria

# -----------------------------------------------------------------------------
# a story of a group


@dataclass
class Story:
    """One member of a group: a sampled story, or the human reference (is_ref)."""
    prompt_ids: list
    completion_ids: list  # through the end-of-turn token, or max_new_tokens long when truncated
    mask: list  # per completion token: 1 if trained
    text: str  # what the judge reads: the answer after the thinking
    is_ref: bool = False
    thinking: str = ""
    truncated: bool = False  # hit max_new_tokens
    in_thinking: bool = False  # ...before the story began: an empty story
    sample_logp: list = None  # each sampled token's log-prob under the distribution it was drawn from
    judged: dict = None  # judge.py's result: reward, sq, ratio, scores, error, cost, ...
    adv: float = 0.0


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


def reference_story(tok, row, enable_thinking, eos, mask_think=True):
    """HRI: the human story of `row` as a member of its group: the tokens the policy would emit after
    its generation prompt to write it, through the end-of-turn token (the conversation's rendering
    minus the generation prompt's). mask_think leaves out the empty thinking block that comes first."""
    story = row["story"].strip()  # templates may trim the answer; the human story must be found in it
    user = [dict(role="user", content=row["prompt"])]
    head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking)
    full = tok.apply_chat_template(user + [dict(role="assistant", content=story)], tokenize=False,
                                   enable_thinking=enable_thinking)
    answer = full[len(head):] if full.startswith(head) else ""
    at = answer.find(story)
    ends = [(answer.find(e, at + len(story)), e) for e in (tok.decode([i]) for i in eos)]
    ends = [(pos, e) for pos, e in ends if pos >= 0]
    if at < 0 or not ends:
        raise ValueError("the chat template does not render the story as the answer to its generation prompt")
    pos, end = min(ends)
    cut = pos + len(end)  # the model never emits the newline the template puts after it
    pre = tok(answer[:at], add_special_tokens=False).input_ids
    body = tok(answer[at:cut], add_special_tokens=False).input_ids
    mask = [int(not mask_think)] * len(pre) + [1] * len(body)
    return Story(tok(head, add_special_tokens=False).input_ids, pre + body, mask, text=row["story"], is_ref=True)

# -----------------------------------------------------------------------------
# sampling a group


class PresencePenalty(LogitsProcessor):
    """Subtract `penalty` from the logit of each token already generated, as vLLM and OpenAI do."""

    def __init__(self, penalty, prompt_len):
        self.penalty, self.prompt_len = penalty, prompt_len

    def __call__(self, input_ids, scores):
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, input_ids[:, self.prompt_len:], True)
        return scores - self.penalty * seen.to(scores.dtype)


def split_thinking(text, enable_thinking, truncated):
    """-> (thinking, story, truncated_in_thinking): the story follows </think>; thinking on and none: all thinking."""
    if "</think>" in text:
        thinking, story = text.split("</think>", 1)
        return thinking.replace("<think>", "").strip(), story.strip(), False
    if enable_thinking:
        return text.replace("<think>", "").strip(), "", truncated
    return "", text.strip(), False


class RowSampler(LogitsProcessor):
    """The last logits processor: draws each row's token from softmax(scores) with the row's own
    generator (a story depends on its seed, not its batch) and leaves only it for generate() to
    pick; records its log-prob under that distribution for the loss's importance weights."""

    def __init__(self, seeds, device):
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.logps = []  # one (B,) tensor per decoding step

    def __call__(self, input_ids, scores):
        logp = scores.float().log_softmax(-1)
        pick = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(logp.exp(), self.gens)])
        self.logps.append(logp.gather(1, pick[:, None])[:, 0].cpu())
        return torch.full_like(scores, -float("inf")).scatter_(1, pick[:, None], 0.0)


class OnFinish(StoppingCriteria):
    """on_done(row, completion_ids) at the decoding step a row emits its first eos (to the judge
    while longer ones decode), on_step() after each; stops generation only when should_stop()."""

    def __init__(self, eos, prompt_len, on_done, on_step=None, should_stop=None):
        self.eos, self.prompt_len, self.on_done, self.seen = eos, prompt_len, on_done, None
        self.on_step, self.should_stop = on_step, should_stop

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.isin(input_ids[:, -1], torch.tensor(self.eos, device=input_ids.device))
        if self.seen is None:
            self.seen = torch.zeros_like(done)
        for b in (done & ~self.seen).nonzero()[:, 0].tolist():
            self.on_done(b, input_ids[b, self.prompt_len:].tolist())
        self.seen |= done  # rows already finished are padded with pad, which may be an eos id
        if self.on_step:
            self.on_step()
        return torch.full_like(done, bool(self.should_stop and self.should_stop()))


@torch.no_grad()
def sample(model, tok, prompts, seeds, n, eos, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
           repetition_penalty=1.0, presence_penalty=0.0, enable_thinking=True, on_done=None, on_step=None,
           should_stop=None):
    """n Stories for each prompt (token id lists), all in one generate() call over left-padded
    prompts; story j of prompt i is drawn with seed seeds[i] * 1000 + j. on_done(i, j, story) is
    called the step it ends (and after generate() for the truncated ones); on_step() after every
    decoding step; should_stop() True ends generation early, the unfinished stories truncated."""
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
    stories = [None] * len(rows)

    def finish(b, ids):
        stop = next((i for i, t in enumerate(ids) if t in eos), None)
        ids = ids[: stop + 1] if stop is not None else ids[:max_new_tokens]
        text = tok.decode(ids[:-1] if stop is not None else ids, skip_special_tokens=False)
        thinking, story, in_thinking = split_thinking(text, enable_thinking, stop is None)
        stories[b] = Story(rows[b], ids, [1] * len(ids), text=story, thinking=thinking, truncated=stop is None,
                           in_thinking=in_thinking, sample_logp=torch.stack(sampler.logps[:len(ids)])[:, b].tolist())
        if on_done:
            on_done(b // n, b % n, stories[b])

    out = model.generate(input_ids=x, attention_mask=attn, do_sample=False, max_new_tokens=max_new_tokens,
                         repetition_penalty=repetition_penalty, logits_processor=procs + [sampler], eos_token_id=eos,
                         pad_token_id=tok.pad_token_id,
                         stopping_criteria=[OnFinish(eos, T, finish, on_step=on_step, should_stop=should_stop)])
    for b, row in enumerate(out[:, T:].tolist()):
        if stories[b] is None:  # truncated at max_new_tokens
            finish(b, row)
    return [stories[i * n:(i + 1) * n] for i in range(len(prompts))]

# -----------------------------------------------------------------------------
# collation and log-probabilities


def collate(stories, pad_id):
    """Stories -> input_ids, attention_mask (B, T), and over next-token targets (B, T-1): the mask,
    1 where a story's completion mask is 1, and each sampled token's log-prob under the
    distribution it was drawn from (NaN elsewhere: the reference's tokens were not sampled)."""
    T = max(len(s.prompt_ids) + len(s.completion_ids) for s in stories)
    ids = torch.full((len(stories), T), pad_id, dtype=torch.long)
    attn = torch.zeros(len(stories), T, dtype=torch.long)
    mask, sample_logp = torch.zeros(len(stories), T - 1), torch.full((len(stories), T - 1), float("nan"))
    for b, s in enumerate(stories):
        p, n = len(s.prompt_ids), len(s.prompt_ids) + len(s.completion_ids)
        ids[b, :n] = torch.tensor(s.prompt_ids + s.completion_ids)
        attn[b, :n] = 1
        mask[b, p - 1: n - 1] = torch.tensor(s.mask, dtype=torch.float)  # the target at t is ids[t + 1]
        if s.sample_logp:
            sample_logp[b, p - 1: p - 1 + len(s.sample_logp)] = torch.tensor(s.sample_logp)
    return ids, attn, mask, sample_logp


def _softmax_(x):
    """Row-wise softmax that overwrites x and returns logsumexp(x): one (c, V) buffer, no copy."""
    mx = x.max(-1, keepdim=True).values
    total = x.sub_(mx).exp_().sum(-1, keepdim=True)
    x.div_(total)
    return (total.log_() + mx)[:, 0]


class ChunkedLogProb(torch.autograd.Function):
    """log softmax(h @ W.T / T)[target] and the entropy for N rows, `chunk` rows at a time, the
    logits recomputed in backward: one chunk x V buffer instead of several N x V ones (8 GB each)."""

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


def token_logprobs(model, input_ids, attention_mask, mask, temperature=1.0, chunk=1024):
    """(B, T-1) log-probs and entropies of each next token where mask is set, at the sampling
    temperature (the policy that acted), never building the full (B, T, V) logits."""
    h = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    sel = mask.bool()
    logp, ent = ChunkedLogProb.apply(h[:, :-1][sel], model.get_output_embeddings().weight,
                                     input_ids[:, 1:][sel], temperature, chunk)
    zeros = torch.zeros(mask.shape, device=h.device, dtype=torch.float32)
    return zeros.masked_scatter(sel, logp), zeros.masked_scatter(sel, ent)

# -----------------------------------------------------------------------------
# advantages and loss


def group_advantages(R, scale_rewards="group", eps=1e-4):
    """R (G,) -> (A (G,), zero_std): (R - mean) / (std + eps), or R - mean (scale_rewards='none');
    a NaN reward (the judge failed) is left out and gets 0; zero_std: the group carries no signal."""
    ok = ~torch.isnan(R)
    A = torch.zeros_like(R)
    if ok.sum() < 2:
        return A, True
    r = R[ok]
    std = r.std(unbiased=False)  # population std, as in TRL
    A[ok] = r - r.mean()
    if scale_rewards == "group":
        A[ok] = A[ok] / (std + eps)
    return A, bool(std < eps)


def grpo_loss(logp, old_logp, adv, mask, loss_norm, denom, clip_low=0.2, clip_high=0.28, kl_logp=None, kl_coef=0.0,
              is_ref=None, gamma=0.0, is_weight=None):
    """The clipped policy-gradient loss per sequence (B,); logp, old_logp, mask (B, T-1), adv (B,).
    On-policy the ratio is 1. denom is counted over every rank ('token': DAPO, 'seq': GRPO,
    'constant': Dr. GRPO). is_weight: truncated importance weights; gamma > 0: LUFFY's -A p/(p+gamma)
    on the references' (is_ref) tokens; kl_logp: the initial policy's, for a k3 KL term."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_tok = -torch.min(ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a)
    if is_weight is not None:
        per_tok = per_tok * is_weight
    if gamma and is_ref is not None and is_ref.any():
        p = torch.exp(logp)
        per_tok = torch.where(is_ref[:, None], -a * p / (p + gamma), per_tok)
    if kl_coef:
        d = kl_logp - logp  # k3 estimator of KL(pi || pi_init), always >= 0
        per_tok = per_tok + kl_coef * (torch.exp(d) - d - 1)
    per_seq = (per_tok * mask).sum(1)
    if loss_norm == "seq":
        per_seq = per_seq / mask.sum(1).clamp(min=1)
    return per_seq / denom


def micro_batches(lengths, budget):
    """Indices grouped into micro-batches of at most `budget` padded tokens (count x longest),
    sorted by length so that little is padding; a sequence longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    out = [[]]
    for i in order:
        if out[-1] and (len(out[-1]) + 1) * lengths[i] > budget:
            out.append([])
        out[-1].append(i)
    return out
