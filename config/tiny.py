# The paper run's code path on a CPU in a few minutes: a tiny random Qwen3.5-architecture
# model (4 layers, hidden 64, a 1,024-token BPE trained on data/sample), the local heuristic
# judge, the bundled sample stories.
#   python train.py config/tiny.py
#   torchrun --standalone --nproc_per_node=2 train.py config/tiny.py   (2 gloo ranks, 1 group each)
# Batch: 2 groups x 6 = 12 sequences per step (5 sampled stories + 1 human reference each).
out_dir = "out/tiny"
init_from = "tiny"
dtype = "float32"  # CPUs have no fast bf16 path
gradient_checkpointing = False  # the activations are tiny
device_memory_gb = 0.0
max_steps = 60
save_interval = 20
batch_groups = 2
learning_rate = 1e-2  # a random 0.3M-parameter model needs a large step to learn anything in a minute
warmup_steps = 3
# A random model never closes a thinking block, so every story would be empty; thinking is
# off here and on in the paper run (tests cover the thinking split and its masking).
enable_thinking = False
# One sequence per forward/backward, the smallest peak memory; --micro_batch_tokens=4096 trains
# the 12 sequences in 2 passes, ~1.5x faster, for ~+25% peak RSS (bench.py's train rows).
micro_batch_tokens = 1
max_new_tokens = 96  # the stories ask for ~300-420 words: every rollout is short (length score 0)
temperature = 1.0
top_p = 1.0
top_k = 0
presence_penalty = 0.0
judge_url = "local"  # the built-in heuristic judge, started in-process on 127.0.0.1
judge_model = "polaris-local"
judge_key_env = ""
judge_workers = 8
judge_extra = {}
judge_price_in = 0.0
judge_price_out = 0.0
# held-out evaluation: the six held-out prompts at steps 0, 20, 40 and 60, with the evaluation's
# sampling (temperature 0.6, top_p 0.95, top_k 20), scored by a second local judge (the same
# heuristic; the paper evaluates with GPT-5.4, config/polaris.py)
eval_interval = 20
eval_data = "data/sample/heldout.jsonl"
