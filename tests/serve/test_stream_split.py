"""ChatStreamSplitter: streamed reasoning/content deltas add up to parse_completion's answer,
and a DSML tool-call block never leaks into streamed content."""

from __future__ import annotations

import pytest

from nanoseek import chat_format
from nanoseek.serve.app import ChatStreamSplitter


def stream_pieces(text: str, mode: str, step: int):
    sp = ChatStreamSplitter(mode)
    reasoning = content = ""
    for end in range(step, len(text) + step, step):
        d = sp.feed(text[:end])
        reasoning += d.get("reasoning_content", "")
        content += d.get("content", "")
        assert chat_format._TOOL_CALLS_OPEN not in content
    d = sp.final(chat_format.parse_completion(text, mode))
    return reasoning + d.get("reasoning_content", ""), content + d.get("content", "")


CALLS = [{"type": "function", "function": {"name": "run", "arguments": '{"code": "print(1)"}'}}]


@pytest.mark.parametrize("step", [1, 3, 7])
@pytest.mark.parametrize("mode,text", [
    ("chat", "Here is the answer.\nDone."),
    ("chat", "Let me run it." + chat_format.render_tool_calls(CALLS)),
    ("thinking", "I should add.</think>The sum is 3."),
    ("thinking", "Use the tool.</think>Running:" + chat_format.render_tool_calls(CALLS)),
    ("thinking", "cut off while thinking <"),
    ("thinking", "<think>plan</think>answer"),              # an echoed opener, arriving piece by piece
    ("thinking", "<thi"),                                   # ... or cut off inside it
    ("chat", "text" + chat_format.EOS + "after"),           # an EOS spelled as text ends the turn
    ("thinking", "plan</think>ok" + chat_format.EOS[:3]),   # a cut-off start of one is kept at the end
])
def test_stream_adds_up_to_parse(mode, text, step):
    want = chat_format.parse_completion(text, mode)
    reasoning, content = stream_pieces(text, mode, step)
    assert content == want["content"]
    assert reasoning == want["reasoning_content"]
    if chat_format._TOOL_CALLS_OPEN in text:
        assert want["tool_calls"] and want["tool_calls"][0]["function"]["name"] == "run"
