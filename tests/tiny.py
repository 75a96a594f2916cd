"""Tiny random Llama models for tests: built from a config, saved as safetensors, no download.

`make_tiny_llama(path)` writes a folder that transformers and vLLM both load: a 2-layer Llama
(hidden 64, one head of dim 64, which vLLM's CPU attention accepts) and a word-level tokenizer
with a ChatML chat template. Its output is noise, but noise from a known vocabulary: `phrases`
become single tokens, so a test can make a random model emit whole strings such as a refusal
sentence or a valid JSON object now and then, and `favor` makes one phrase
its only greedy output.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "you",
    "that",
    "for",
    "on",
    "with",
    "as",
    "how",
    "what",
    "why",
    "do",
    "can",
    "i",
    "are",
    "this",
    "be",
    "not",
    "or",
    "by",
    "from",
    "at",
    "your",
    "we",
    "my",
    "one",
    "all",
    "would",
    "there",
    "their",
    "will",
    "about",
    "which",
    "when",
    "make",
    "like",
    "time",
    "just",
    "know",
    "take",
    "people",
    "into",
    "year",
    "good",
    "some",
    "could",
    "them",
    "see",
    "other",
    "than",
    "then",
    "now",
    "look",
    "only",
    "come",
    "its",
    "over",
    "think",
    "also",
    "back",
    "after",
    "use",
    "two",
    "first",
    "well",
    "way",
    "even",
    "new",
    "want",
    "because",
    "any",
    "these",
    "give",
    "day",
    "most",
    "us",
    "question",
    "answer",
    "help",
    "sure",
    "here",
    "step",
    "system",
    "user",
    "assistant",
    ",",
    ".",
    "?",
    "!",
    ":",
    ";",
    "'",
    '"',
    "{",
    "}",
    "[",
    "]",
]


def make_tiny_llama(
    path: str | Path,
    *,
    phrases: list[str] | tuple[str, ...] = (),
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    favor: str | None = None,
    favor_logit: float = 2.5,
) -> Path:
    """Save a random Llama + tokenizer to `path` and return it. Deterministic for a seed.
    `favor` (a word or phrase of the vocabulary) gets a logit about `favor_logit` above the
    others: greedy decoding emits only that token, sampling at temperature 1 now and then."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if phrases:
        tokenizer.add_tokens(list(phrases))
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    if favor is not None:  # a constant direction in the residual stream, read out by one row
        fid = tokenizer.convert_tokens_to_ids(favor)
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] += 1.0
            model.lm_head.weight[fid, 0] = favor_logit / hidden_size**0.5
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    return path
