"""Gemma's chat format, for tracing instruction-tuned (-it) models on a user turn.

``<bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n``: the tokenizer's own
chat template when it has one, else this fixed Gemma 3 turn format (base checkpoints, such as
the embedded 270M, ship without a template). The first 4 positions are the prefix that gets no
features in the replacement model of an -it model.
"""
from __future__ import annotations

GEMMA_TURN = "{bos}<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"


def chat_prompt(tokenizer, text: str) -> str:
    """The prompt text of one user turn followed by the model's turn opening."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return GEMMA_TURN.format(bos=tokenizer.bos_token or "<bos>", text=text)


def prompt_tokens(tokenizer, text: str, chat: bool):
    """(prompt text, what the replacement model runs on): the text itself, or with ``chat`` the
    chat turn around it and its token ids (the turn already holds <bos>)."""
    if not chat:
        return text, text
    prompt = chat_prompt(tokenizer, text)
    return prompt, tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
