"""Gemma's chat format, for tracing instruction-tuned (-it) models on a user turn.

``<bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n``: the tokenizer's own
chat template when it has one, else this fixed Gemma 3 turn format (base checkpoints, such as
the embedded 270M, ship without a template).

*Positions without nodes*: the replacement model gives no features and no error node to the
leading positions whose MLP outputs are constants of every prompt (circuit-tracer's
``zero_positions``): ``<bos>``, and for a chat turn its prefix ``<bos><start_of_turn>user\n``
(:data:`CHAT_PREFIX_TOKENS` tokens). :func:`skip_positions` is the one place that rule lives;
the count is passed down as ``skip_positions`` everywhere. Conversations (several turns, a
system message, a prefill: :mod:`cltrace.models.conversation`) keep this rule: the 4-token
prefix of their first user turn, nothing more.
"""
from __future__ import annotations

USER_TURN_PREFIX = "{bos}<start_of_turn>user\n"
GEMMA_TURN = USER_TURN_PREFIX + "{text}<end_of_turn>\n<start_of_turn>model\n"
CHAT_PREFIX_TOKENS = 4  # USER_TURN_PREFIX in Gemma 3's vocabulary: <bos> <start_of_turn> user \n


def skip_positions(tokens, start_of_turn_id, instruction_tuned: bool) -> int:
    """How many leading positions of ``tokens [n_pos]`` get no nodes, by the rule above: the
    chat prefix for an instruction-tuned model or a prompt whose second token is
    ``<start_of_turn>`` (``start_of_turn_id``; None when unknown), else ``<bos>`` alone."""
    n = int(tokens.numel())
    chat = n > 1 and start_of_turn_id is not None and int(tokens[1]) == start_of_turn_id
    return min(CHAT_PREFIX_TOKENS if (instruction_tuned or chat) else 1, n)


def chat_prompt(tokenizer, text: str) -> str:
    """The prompt text of one user turn followed by the model's turn opening."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return GEMMA_TURN.format(bos=tokenizer.bos_token or "<bos>", text=text)


def prompt_tokens(tokenizer, text: str, chat: bool, messages=None, images=(), multimodal=None):
    """(prompt text, what the replacement model runs on): the text itself, or with ``chat`` the
    chat turn around it and its token ids (the turn already holds <bos>). ``messages`` (a
    conversation checked by :func:`cltrace.models.conversation.check_messages`) replaces
    ``text`` and ``chat``: its rendering and token ids
    (:func:`cltrace.models.conversation.messages_tokens`). ``images`` (image files, one per
    ``<start_of_image>`` of ``text``) with ``multimodal`` (a
    :class:`~cltrace.models.multimodal.LoadedMultimodal`): (``text``, its
    :class:`~cltrace.models.multimodal.ImagePrompt`, in the chat turn with ``chat``)."""
    if images:
        from ..errors import UsageError

        if multimodal is None:
            raise UsageError("images need a multimodal Gemma 3 model")
        if messages:
            raise UsageError("images go with a PROMPT (and chat), not with messages")
        return text, multimodal.prompt(text, list(images), chat=chat)
    if messages:
        from .conversation import messages_tokens

        return messages_tokens(tokenizer, messages)
    if not chat:
        return text, text
    prompt = chat_prompt(tokenizer, text)
    return prompt, tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
