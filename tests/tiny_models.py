"""Tiny random-weight checkpoints for tests: a byte-level BPE tokenizer and Llama/Qwen2 configs.

Everything is built in a temporary directory from code: nothing is downloaded. Weights are drawn
with a large init scale so that logits are peaked: greedy argmax then has no near-ties for the
last float bits to flip.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding lets a small draft model propose tokens that a large model verifies.",
    "def add(a, b):\n    return a + b\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "Héllo wörld, ünïcode and emoji 🙂 must survive incremental detokenisation.",
] * 20

# prompts of different lengths for engine tests
PROMPTS = [
    "The quick brown fox",
    "Speculative decoding lets a small draft model propose tokens that a large model",
    "def add(a, b):",
    "To",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
]


def greedy(n: int):
    """Greedy sampling of exactly n tokens (EOS ignored), as the equality tests compare."""
    from specserve import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(path: str, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def _save(model, tokenizer, path: str) -> str:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_llama(
    path: str,
    tokenizer,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    tie: bool = False,
) -> str:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=tie,
        rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return _save(LlamaForCausalLM(config), tokenizer, path)


def build_qwen2(path: str, tokenizer, seed: int = 0) -> str:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # HF initialises biases to zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.3)
    return _save(model, tokenizer, path)


def build_all(root: str) -> dict[str, str]:
    tok_dir = os.path.join(root, "tokenizer")
    tokenizer = build_tokenizer(tok_dir)
    return {
        "llama": build_llama(os.path.join(root, "llama"), tokenizer),
        "qwen2": build_qwen2(os.path.join(root, "qwen2"), tokenizer),
        # a draft: another (smaller) random model with the same vocabulary
        "draft": build_llama(os.path.join(root, "draft"), tokenizer, layers=1, hidden=32, heads=2, kv_heads=1, seed=1),
        # a draft that is the verifier itself: every token should be accepted
        "tokenizer": tok_dir,
    }
