"""Conversations as prompts (cltrace.models.conversation): rendering in Gemma 3's turn format
(equal to the chat template's), the checks of bad messages, the JSONL columns (messages,
label, pair) and ``--messages FILE`` for attribute and steer; positions without nodes."""
from __future__ import annotations

import json

import pytest
import torch

from cltrace.batch.prompts import read_prompts
from cltrace.cli import main
from cltrace.errors import UsageError
from cltrace.models.chat import prompt_tokens, skip_positions
from cltrace.models.conversation import check_messages, gemma_render, render_messages
from support.gemma3_chat import templated_tokenizer
from support.tiny_gemma import tiny_replacement, use_tiny_model

U = lambda c: {"role": "user", "content": c}  # noqa: E731
M = lambda c: {"role": "model", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731

CONVERSATIONS = [
    [U("Name a colour.")],
    [S("Answer in one word."), U("  Name a colour. ")],
    [U("Hi"), A("Hello! How can I help?"), U("Tell me a joke.")],
    [S("Be terse.\nNo lists."), U("a"), M("b"), U("c"), M("d"), U("e")],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_rendering_equals_gemma3_chat_template(conv, tmp_path):
    tok = templated_tokenizer(tmp_path)
    want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert gemma_render(check_messages(conv)) == want
    assert render_messages(tok, check_messages(conv)) == want


def test_prefill_leaves_the_model_turn_open(tmp_path):
    tok = templated_tokenizer(tmp_path)
    conv = [S("Sys."), U("How do I do it?"), M("Sure, here is ")]
    text = gemma_render(check_messages(conv))
    assert text == ("<bos><start_of_turn>user\nSys.\n\nHow do I do it?<end_of_turn>\n"
                    "<start_of_turn>model\nSure, here is")
    assert render_messages(tok, check_messages(conv)) == text  # template + prefill, same text
    # the untemplated single turn of --chat is the one-message conversation
    assert prompt_tokens(tok, "x", False, check_messages([U("q")]))[0] == \
        "<bos><start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("conv, words", [
    ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
    ([U("a"), {"role": "user", "content": "  "}], "message 2 (user): empty content"),
    ([U("a"), U("b")], "message 2 is a user turn where a model turn comes"),
    ([M("a")], "message 1 is a model turn where a user turn comes"),
    ([U("a"), S("b")], "message 2: a system message must come first"),
    ([S("a")], "a system message alone"),
    ([], "non-empty list"),
    ([{"role": "user", "content": "a", "name": "x"}], "unknown key 'name'"),
])
def test_bad_messages_are_named(conv, words):
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_messages(conv, "chat.json")


def test_skip_positions_keep_the_chat_rule():
    """Gemma 3's ids of a two-turn conversation with a prefill: the 4-token prefix of the
    first user turn has no nodes, every later template token has (the rule of --chat)."""
    # <bos> <start_of_turn> user \n hi <end_of_turn> \n <start_of_turn> model \n Sure ...
    ids = torch.tensor([2, 105, 2364, 107, 2202, 106, 107, 105, 4368, 107, 49190])
    assert skip_positions(ids, 105, instruction_tuned=False) == 4
    assert skip_positions(ids[[0, 4]], 105, instruction_tuned=False) == 1


def test_prompts_jsonl_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"messages": [S("s"), U("What is up?"), M("Sure")], "label": "harmful", "pair": 3},
            {"prompt": "plain", "label": "harmless", "pair": "3", "slug": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = read_prompts(path)
    assert a.messages == (("system", "s"), ("user", "What is up?"), ("model", "Sure"))
    assert (a.prompt, a.slug, a.label, a.pair) == ("What is up?", "what-is-up", "harmful", "3")
    assert (b.messages, b.label, b.pair) == ((), "harmless", "3")
    for bad, words in [({"prompt": "x", "colour": 1}, "unknown column 'colour'"),
                       ({"prompt": "x", "messages": [U("y")]}, "'prompt' or 'messages', not both"),
                       ({"messages": [U("y"), U("z")]}, "line 1: messages: message 2 is a user turn"),
                       ({"slug": "x"}, "a string 'prompt' or a 'messages' list"),
                       ({"prompt": "x", "label": 1}, "'label' must be a string")]:
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(UsageError, match=words):
            read_prompts(path)


@pytest.fixture
def tiny_cli(monkeypatch):
    rm = tiny_replacement("plt", dtype=torch.float32)
    use_tiny_model(monkeypatch, rm)
    return rm


def test_messages_file_for_attribute_and_steer(tiny_cli, tmp_path, capsys):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([S("sys"), U("hi there"), M("ok"), U("go on"), M("Sure,")]))
    assert main(["attribute", "--messages", str(chat), "--out", str(tmp_path / "g"), "--quiet",
                 "--max-feature-nodes", "8", "--format", "json"]) == 0
    data = json.loads((tmp_path / "g" / "go-on.json").read_text())
    assert data["metadata"]["prompt"].endswith("<start_of_turn>model\nSure,")
    assert main(["steer", "--messages", str(chat), "-f", "1:3+2", "--max-new-tokens", "2",
                 "--quiet"]) == 0
    assert "<start_of_turn>model\\nSure,'" in capsys.readouterr().out
    chat.write_text(json.dumps({"messages": [U("a"), {"role": "robot", "content": "b"}]}))
    capsys.readouterr()
    assert main(["steer", "--messages", str(chat), "-f", "1:3+2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--messages {chat}: message 2: unknown role 'robot'" in err[0], err
    assert main(["steer", "x", "--messages", str(chat), "-f", "1:3+2"]) == 2
    assert "one of them" in capsys.readouterr().err


@pytest.mark.real_model
def test_real_tokenizer_ids_of_a_conversation(real_gemma):
    """The embedded 270M's tokenizer (no template): the fixed format's ids, and the same
    4 positions without nodes as --chat."""
    from cltrace.models.conversation import messages_tokens

    tok = real_gemma.tokenizer
    assert not getattr(tok, "chat_template", None)
    text, ids = messages_tokens(tok, check_messages([U("hi"), M("Sure"), U("ok"), M("Sure")]))
    assert ids.tolist()[:11] == [2, 105, 2364, 107, 2202, 106, 107, 105, 4368, 107, 49190]
    assert ids.tolist()[-4:] == [105, 4368, 107, 49190]  # the prefill, no <end_of_turn> after it
    assert skip_positions(ids, tok.convert_tokens_to_ids("<start_of_turn>"), False) == 4
