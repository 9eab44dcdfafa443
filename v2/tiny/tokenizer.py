"""A small byte-level BPE tokenizer for the tiny GSM model, built offline.

The pre-tokenizer is Qwen2's regex, which isolates every digit, so numbers are always spelled
digit by digit (much easier for a small model to learn arithmetic on). The byte alphabet is
always in the vocabulary and there is no normalizer, so any text round-trips exactly.

CLI: ``python -m v2.tiny.tokenizer --out DIR``
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from v2.tiny.data import make_problem

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK_TOKEN = "|<MASK>|"
# Trained special tokens get the first ids in this order: 0, 1, 2, 3.
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, MASK_TOKEN]
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2's pre-tokenization regex; note ``\p{N}`` matches exactly one digit.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML as in Qwen2.5 (without tool calls): a default system prompt when none is given.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def _corpus(seed: int, n_problems: int = 5000) -> Iterator[str]:
    """Training text: generated problems in the plain prompt format and the chat format.

    Special tokens are left out (they are added tokens, never merged); their surrounding text
    (role names, system prompt) is kept so that it gets compact tokens.
    """
    rng = random.Random(seed)
    for _ in range(n_problems):
        problem = make_problem(rng)
        yield f"Question: {problem['question']}\nAnswer: {problem['answer']}\n"
        yield f"system\n{DEFAULT_SYSTEM_PROMPT}\nuser\n{problem['question']}\n"
        yield f"assistant\n{problem['answer']}\n"


def build_tokenizer(
    out_dir: Path, seed: int = 0, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train the BPE on generated problems, save it under ``out_dir`` and return it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        # Registered as special so decode(skip_special_tokens=True) drops them.
        extra_special_tokens=[IM_START, MASK_TOKEN],
        chat_template=CHAT_TEMPLATE,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args(argv)
    tok = build_tokenizer(args.out, seed=args.seed, vocab_size=args.vocab_size)
    print(f"saved tokenizer with {len(tok)} tokens to {args.out}")


if __name__ == "__main__":
    main()
