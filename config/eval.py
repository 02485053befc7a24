# The paper's evaluation judge: GPT-5.4 over OpenAI's API, for --task=score and --task=pairwise.
#   export OPENAI_API_KEY=...
#   python eval.py config/eval.py --task=score --gens=out/eval/mine.jsonl,out/eval/base.jsonl
judge_url = "https://api.openai.com/v1"
judge_model = "gpt-5.4"
judge_key_env = "OPENAI_API_KEY"  # the variable's name; the key is never logged or saved
judge_workers = 16
judge_extra = {"reasoning_effort": "low"}
# $ per million tokens: check OpenAI's current price list before trusting the cost column
judge_price_in = 2.50
judge_price_out = 15.0
judge_cache = "out/eval/judge_cache"
max_chars = 0  # pairwise: set e.g. 4000 to judge only each story's opening, against length bias
