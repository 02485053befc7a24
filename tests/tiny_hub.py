"""A tiny folder in the layout of the hub's Qwen/Qwen3.5-9B, built offline: a vision-language
checkpoint (Qwen3_5ForConditionalGeneration, text and vision sub-configs, tensors under
model.language_model.* and model.visual.*, plus an mtp.* tensor that transformers ignores on
load), sharded with an index, a tokenizer with Qwen's special tokens and Qwen3.5's chat
template, a generation_config with both eos ids, and the processor configs."""
import json
import os

import torch

import tiny

QWEN_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def build_tiny_hub(folder, data=("data/sample/train.jsonl",), seed=0):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from safetensors.torch import load_file, save_file
    _, tok = tiny.build_tiny(list(data), seed=seed)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL + ["<|im_end|>", "<|endoftext|>"]}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,  # 3 linear : 1 full
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                max_position_embeddings=8192, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=64)
    config = Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen3_5ForConditionalGeneration(config).to(torch.bfloat16)  # the hub's dtype
    model.save_pretrained(folder, max_shard_size="300KB")  # several shards and an index, as on the hub
    # the hub's files also carry the multi-token-prediction head, which transformers skips on load
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(index_path))
    last = sorted(set(index["weight_map"].values()))[-1]
    tensors = load_file(os.path.join(folder, last))
    tensors["mtp.fc.weight"] = torch.randn(64, 128).to(torch.bfloat16)
    save_file(tensors, os.path.join(folder, last), metadata={"format": "pt"})
    index["weight_map"]["mtp.fc.weight"] = last
    json.dump(index, open(index_path, "w"), indent=2)
    tok.save_pretrained(folder)
    json.dump(dict(bos_token_id=None, pad_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                   do_sample=True, temperature=1.0, top_p=0.95, top_k=20),
              open(os.path.join(folder, "generation_config.json"), "w"), indent=2)
    json.dump(dict(image_processor_type="Qwen2VLImageProcessorFast", patch_size=16, merge_size=2, temporal_patch_size=2),
              open(os.path.join(folder, "preprocessor_config.json"), "w"), indent=2)
    json.dump(dict(video_processor_type="Qwen3VLVideoProcessor", patch_size=16, merge_size=2),
              open(os.path.join(folder, "video_preprocessor_config.json"), "w"), indent=2)
    return folder
