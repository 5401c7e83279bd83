"""Conversations: a prompt that is a list of chat messages, rendered in Gemma 3's turn format.

A message is ``{"role": "system"|"user"|"model"|"assistant", "content": str}`` ("assistant" is
read as "model"). The rules, as Gemma 3's own chat template enforces them: an optional
``system`` message first (folded into the first user turn as ``{system}\\n\\n{user}``), then
user and model turns alternating, starting with a user turn. Each content is stripped of
leading and trailing white space (the template's ``| trim``). A *last* model message is a
**prefill**: its turn is left open (no ``<end_of_turn>`` after it), so the model continues it
("Sure, here is"). Without a prefill the conversation ends with a user turn and the model's
turn opening, as ``apply_chat_template(..., add_generation_prompt=True)`` writes it::

    <bos><start_of_turn>user\\n{system}\\n\\n{user 1}<end_of_turn>\\n
    <start_of_turn>model\\n{model 1}<end_of_turn>\\n
    <start_of_turn>user\\n{user 2}<end_of_turn>\\n
    <start_of_turn>model\\n{prefill}

The tokenizer's own chat template renders it when it has one (the prefill appended after the
generation prompt); otherwise the fixed format above (base checkpoints, such as the embedded
270M, ship without a template).

*Positions without nodes* follow today's chat rule (:func:`cltrace.models.chat.skip_positions`)
unchanged: a token stream whose second token is ``<start_of_turn>`` skips the 4-token prefix
``<bos><start_of_turn>user\\n``, and nothing else. The system text, every earlier turn, the later
template tokens (``<end_of_turn>``, ``<start_of_turn>model\\n``) and the prefill all get
features and error nodes: only the leading positions whose MLP outputs are the same for every
prompt are constants; a later template token's activations depend on the conversation before it.
"""
from __future__ import annotations

from ..errors import UsageError

ROLES = ("system", "user", "model", "assistant")
GEMMA_BOS = "<bos>"


def check_messages(messages, where: str = "messages") -> tuple:
    """The conversation ``messages`` (a list of {"role", "content"} objects) checked and
    normalized: a tuple of (role, content) with role in system/user/model, content stripped.
    Raises UsageError naming ``where`` and the message (1-based) for an unknown role, an empty
    or non-string content, a system message not first, or turns that do not alternate."""
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: expected a non-empty list of {{\"role\", \"content\"}} messages")
    out = []
    for i, m in enumerate(messages, 1):
        here = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise UsageError(f"{here}: expected an object with 'role' and 'content'")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise UsageError(f"{here}: unknown key {extra[0]!r} (a message has 'role' and 'content')")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UsageError(f"{here}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise UsageError(f"{here} ({role}): empty content")
        role = "model" if role == "assistant" else role
        if role == "system" and i != 1:
            raise UsageError(f"{here}: a system message must come first")
        out.append((role, content.strip()))
    turns = out[1:] if out[0][0] == "system" else out
    if not turns:
        raise UsageError(f"{where}: a system message alone (add a user message)")
    for k, (role, _) in enumerate(turns):
        want = "user" if k % 2 == 0 else "model"
        if role != want:
            n = k + 1 + (len(out) - len(turns))
            raise UsageError(f"{where}: message {n} is a {role} turn where a {want} turn comes "
                             "(user and model turns alternate, starting with user)")
    return tuple(out)


def gemma_render(messages, bos: str = GEMMA_BOS) -> str:
    """Gemma 3's turn format of checked ``messages`` (see the module doc), without a template."""
    msgs = list(messages)
    system = msgs.pop(0)[1] + "\n\n" if msgs[0][0] == "system" else ""
    prefill = msgs.pop()[1] if msgs[-1][0] == "model" else None
    parts = [bos]
    for k, (role, content) in enumerate(msgs):
        parts.append(f"<start_of_turn>{role}\n{system if k == 0 else ''}{content}<end_of_turn>\n")
    parts.append("<start_of_turn>model\n" + (prefill or ""))
    return "".join(parts)


def render_messages(tokenizer, messages) -> str:
    """The prompt text of checked ``messages``: the tokenizer's chat template (with the
    generation prompt, then the prefill) when it has one, else :func:`gemma_render`."""
    msgs = list(messages)
    if getattr(tokenizer, "chat_template", None):
        prefill = msgs.pop()[1] if msgs[-1][0] == "model" else ""
        text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in msgs],
                                             tokenize=False, add_generation_prompt=True)
        return text + prefill
    return gemma_render(msgs, getattr(tokenizer, "bos_token", None) or GEMMA_BOS)


def messages_tokens(tokenizer, messages):
    """(prompt text, token ids [n_pos] int64) of checked ``messages`` (the text holds <bos>)."""
    text = render_messages(tokenizer, messages)
    return text, tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def messages_title(messages) -> str:
    """A short text standing for a conversation (slugs, tables): its last user message."""
    return [c for r, c in messages if r == "user"][-1]

