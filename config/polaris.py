# The paper run: POLARIS-9B, the model card's training table.
#   export GEMINI_API_KEY=...
#   torchrun --standalone --nproc_per_node=4 train.py config/polaris.py
# The same command continues the run after a crash or preemption (resume='auto'); several nodes,
# restarts and SLURM: docs/scale.md.
# Batch: 8 groups x 6 = 48 sequences per step (40 sampled stories + 8 human references),
# 2 groups per rank on 4 GPUs. 160 steps x 8 prompts = 1,280 prompts: about one pass over the
# paper's ~1,388 prompt-story pairs. Memory per A100 80GB (printed at start): bf16 weights
# 18 GB + a quarter of the fp32 gradient sum 9 GB + a quarter of AdamW's 12 bytes x 9B 27 GB
# + ~6 GB of activations for a 9,216-token micro-batch = 59 GB.
# I/O
out_dir = "out/polaris"
save_interval = 20  # 8 checkpoints in a ~48 h run: a crash loses at most ~6 h
keep_last = 3  # each checkpoint is ~18 GB of weights + ~27 GB of optimizer shards per rank
resume = "auto"  # continue from the newest checkpoint when out_dir has one: one command starts and restarts
# data
train_data = "data/polaris/train.jsonl"  # your anthology, built by data/prepare.py (see README)
max_ref_words = 4000  # the paper's references are at most 4,000 words
# model
init_from = "Qwen/Qwen3.5-9B"  # hybrid: 3 of 4 layers Gated DeltaNet, 1 of 4 full attention
dtype = "bfloat16"  # weights and gradients; AdamW's master weights and moments stay fp32
gradient_checkpointing = True  # an 8k-token sequence's activations would not fit otherwise
# grpo
max_steps = 160  # the card
batch_groups = 8  # the card: 8 prompts per step
group_size = 6  # the card: 5 rollouts + 1 human reference
n_ref = 1  # HRI on; 0 for the ablation
ref_reward = "judge"  # the reference is judged like every rollout
ref_mask_think = True  # never train the reference's empty thinking block
ref_shaping_gamma = 0.0  # not in the card: 0.1 tries LUFFY's shaping if entropy collapses or ref_nll falls too fast
scale_rewards = "group"  # standard GRPO: (R - mean) / (std + eps) within the group
loss_norm = "token"  # token mean over the whole batch (DAPO, TRL's default)
num_iterations = 1  # strictly on-policy: one update per batch, ratio 1
kl_coef = 0.0  # no KL: no second 18 GB model (TRL's default, beta = 0)
# Not in the card: 1e-6 is the usual full-parameter GRPO rate for 7-9B models (TRL's default,
# DAPO's choice); with token-mean loss and a human anchor, larger rates drift the style fast.
learning_rate = 1e-6
warmup_steps = 10  # not in the card: ~6% of the run, while AdamW's second moments settle
weight_decay = 0.0  # RL fine-tuning from a strong model: no pull towards zero
grad_clip = 1.0
micro_batch_tokens = 9216  # padded tokens per forward/backward: one 8k rollout, or several shorter stories
logprob_chunk = 1024  # 1,024 x 248,320 fp32 logits = 1 GB at a time instead of 8 GB per sequence
seed = 1337
tis_cap = 2.0  # presence penalty, top-k and top-p make the sampler differ from the policy: truncated IS weights
dist_timeout_s = 7200.0  # above the slowest step's wait for the slowest rank: an 8k-token decode plus judge retries
lock_stale_s = 120.0  # out_dir's lock may be taken over after this long without its run's refresh (a requeue)
# rollout: the card's recommended sampling, thinking on
enable_thinking = True
# Not in the card for training: references reach 4,000 words (~5,400 tokens) and thinking
# takes ~1-2k more, so 8,192 tokens; the card's 14,336 is for 8-12k-word evaluation prompts.
max_new_tokens = 8192
temperature = 0.6  # the card: 0.4-1.0, 0.4-0.6 for long stories; log-probs use the same T
top_p = 0.95  # the card
top_k = 20  # the card
repetition_penalty = 1.0  # the card: never both penalties at once; presence is used instead
presence_penalty = 1.0  # the card: 0.0-1.5; curbs loops in long generations
# judge: Gemini 3 Flash over Google's OpenAI-compatible endpoint
judge_url = "https://generativelanguage.googleapis.com/v1beta/openai"
judge_model = "gemini-3-flash-preview"
judge_key_env = "GEMINI_API_KEY"  # the variable's name; the key is never logged or saved
judge_workers = 16  # per rank: a rank judges 12 stories a step, while it generates
judge_timeout = 300.0  # one deadline per request, the whole reply included
judge_retries = 6  # on 429, 5xx, timeouts and bodies cut on the wire, with backoff up to judge_backoff_max
judge_backoff_max = 60.0
judge_reasks = 2  # a reply that does not parse is shown back to the judge this many times
judge_max_tokens = 8192  # the reply's cap, sent as max_completion_tokens (a provider that rejects it: 0)
judge_max_reply_bytes = 1_000_000  # a larger reply is a failure, never parsed or cached
judge_max_fail_frac = 0.5  # a step with more unscored stories than this stops the run before its update
judge_extra = {"reasoning_effort": "low"}  # the paper used the flex tier: add your provider's field here
judge_price_in = 0.50  # $ per million tokens, standard tier at the time of writing (flex is cheaper)
judge_price_out = 3.00
length_weight = 25.0  # missing the requested length costs up to 25 SQ points
# held-out evaluation, by the paper's evaluation judge (GPT-5.4), never the one the policy is trained
# against: data/prepare.py's held-out split (10%, ~140 prompts: ~35 a rank, 4 decodes of 10) at
# steps 0, 20, ..., 160, about the cost of 4 steps' generation each time (docs/training.md)
eval_interval = 20
eval_data = "data/polaris/heldout.jsonl"
eval_judge_url = "https://api.openai.com/v1"
eval_judge_model = "gpt-5.4"
eval_judge_key_env = "OPENAI_API_KEY"  # the variable's name; the key is never logged or saved
eval_judge_extra = {"reasoning_effort": "low"}
eval_judge_price_in = 2.50  # $ per million tokens, as config/eval.py
eval_judge_price_out = 15.0
