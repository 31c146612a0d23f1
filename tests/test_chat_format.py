"""Tests for nanoseek.chat_format (DeepSeek-V4 chat encoding).

Expected prompts are written out by hand from the documented format (the official release's
encoding/README.md), with the token strings spelled literally here rather than imported, so that
a wrong constant in the module cannot make its own test pass. One official test vector
(tests/fixtures/reference/chat-encoding, byte-identical with the official release's) is checked byte
for byte.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from nanoseek import chat_format as cf
from nanoseek.chat_format import encode_messages, parse_completion

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
U = "<｜User｜>"
A = "<｜Assistant｜>"
D = "｜DSML｜"

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference" / "chat-encoding"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_SCHEMA = ('{"name": "get_weather", "description": "Weather for a city", "parameters": {"type": "object", '
                  '"properties": {"city": {"type": "string"}}, "required": ["city"]}}')

# The tools section exactly as the README documents it, with {tool_definitions_json} to fill.
TOOLS_BLOCK = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{tool_definitions_json}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

MAX_EFFORT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)


def call(name, arguments, call_id=None):
    tc = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id:
        tc["id"] = call_id
    return tc


# ------------------------------------------------------------------ official test vector

def test_official_vector_3_byte_identical():
    src, gold = REFERENCE / "official-test-3.json", REFERENCE / "official-test-3.txt"
    case = json.loads(src.read_text(encoding="utf-8"))
    expected = gold.read_text(encoding="utf-8")
    got = encode_messages(case["messages"], thinking_mode=case["thinking_mode"],
                          reasoning_effort=case["reasoning_effort"])
    assert got == expected


# ------------------------------------------------------------------ roles and modes

def test_readme_quick_start_thinking_generation_prompt():
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2+2?"}]
    assert encode_messages(msgs, thinking_mode="thinking") == (
        BOS + "You are a helpful assistant." + U + "What is 2+2?" + A + "<think>")
    assert encode_messages(msgs, thinking_mode="chat") == (
        BOS + "You are a helpful assistant." + U + "What is 2+2?" + A + "</think>")


def test_chat_mode_multi_turn_never_shows_reasoning():
    msgs = [{"role": "system", "content": "S"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "secret1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2", "reasoning_content": "secret2"}]
    assert encode_messages(msgs, "chat") == (
        BOS + "S" + U + "q1" + A + "</think>a1" + EOS + U + "q2" + A + "</think>a2" + EOS)


def test_thinking_mode_drops_reasoning_before_last_user_turn():
    msgs = [{"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2", "reasoning_content": "r2"}]
    assert encode_messages(msgs, "thinking") == (
        BOS + U + "q1" + A + "</think>a1" + EOS + U + "q2" + A + "<think>r2</think>a2" + EOS)
    # Generation prompt for a third turn: all earlier reasoning gone, think block opened.
    third = msgs + [{"role": "user", "content": "q3"}]
    assert encode_messages(third, "thinking") == (
        BOS + U + "q1" + A + "</think>a1" + EOS + U + "q2" + A + "</think>a2" + EOS + U + "q3" + A + "<think>")


def test_drop_thinking_false_keeps_every_turns_reasoning():
    msgs = [{"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "user", "content": "q2"}]
    assert encode_messages(msgs, "thinking", drop_thinking=False) == (
        BOS + U + "q1" + A + "<think>r1</think>a1" + EOS + U + "q2" + A + "<think>")


def test_consecutive_user_messages_fold_into_one_turn():
    msgs = [{"role": "user", "content": "part one"}, {"role": "user", "content": "part two"}]
    assert encode_messages(msgs, "chat") == BOS + U + "part one\n\npart two" + A + "</think>"


def test_latest_reminder_role():
    msgs = [{"role": "system", "content": "S"},
            {"role": "latest_reminder", "content": "2026-02-21, Paris"},
            {"role": "user", "content": "q"}]
    assert encode_messages(msgs, "chat") == (
        BOS + "S<｜latest_reminder｜>2026-02-21, Paris" + U + "q" + A + "</think>")


def test_developer_role_is_a_user_turn_with_tools():
    msgs = [{"role": "developer", "content": "find it", "tools": [WEATHER_TOOL]}]
    tools = TOOLS_BLOCK.replace("{tool_definitions_json}", WEATHER_SCHEMA)
    assert encode_messages(msgs, "thinking") == BOS + U + "find it\n\n" + tools + A + "<think>"


def test_developer_before_last_user_is_dropped_in_thinking_mode_only():
    msgs = [{"role": "developer", "content": "old instructions"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "user", "content": "q2"}]
    assert encode_messages(msgs, "thinking") == BOS + "a1" + EOS + U + "q2" + A + "<think>"
    assert encode_messages(msgs, "chat") == (
        BOS + U + "old instructions" + A + "</think>a1" + EOS + U + "q2" + A + "</think>")


def test_response_format_on_system():
    fmt = {"type": "json_object"}
    msgs = [{"role": "system", "content": "S", "response_format": fmt}, {"role": "user", "content": "q"}]
    assert encode_messages(msgs, "chat") == (
        BOS + "S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        '{"type": "json_object"}' + U + "q" + A + "</think>")


# ------------------------------------------------------------------ tools

def test_tools_block_and_reasoning_kept_when_tools_present():
    msgs = [{"role": "system", "content": "S", "tools": [WEATHER_TOOL]},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "user", "content": "q2"}]
    tools = TOOLS_BLOCK.replace("{tool_definitions_json}", WEATHER_SCHEMA)
    assert encode_messages(msgs, "thinking") == (
        BOS + "S\n\n" + tools + U + "q1" + A + "<think>r1</think>a1" + EOS + U + "q2" + A + "<think>")


def test_tool_schema_json_keeps_unicode_and_order():
    tool = {"type": "function", "function": {"name": "搜索", "description": "网页", "parameters": {"b": 1, "a": 2}}}
    prompt = encode_messages([{"role": "system", "content": "", "tools": [tool, WEATHER_TOOL]}], "chat")
    assert '{"name": "搜索", "description": "网页", "parameters": {"b": 1, "a": 2}}\n' + WEATHER_SCHEMA + "\n\n" in prompt


def test_tool_calls_string_and_non_string_parameters():
    args = json.dumps({"city": "Paris", "days": 3, "metric": True, "hours": [1, 2], "opts": {"x": None},
                       "note": "line1\nline2"})
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [call("get_weather", args),
                                                                        call("noop", "{}")]}]
    expected_block = (
        f"\n\n<{D}tool_calls>\n"
        f'<{D}invoke name="get_weather">\n'
        f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
        f'<{D}parameter name="days" string="false">3</{D}parameter>\n'
        f'<{D}parameter name="metric" string="false">true</{D}parameter>\n'
        f'<{D}parameter name="hours" string="false">[1, 2]</{D}parameter>\n'
        f'<{D}parameter name="opts" string="false">{{"x": null}}</{D}parameter>\n'
        f'<{D}parameter name="note" string="true">line1\nline2</{D}parameter>\n'
        f"</{D}invoke>\n"
        f'<{D}invoke name="noop">\n\n</{D}invoke>\n'
        f"</{D}tool_calls>")
    assert encode_messages(msgs, "chat") == BOS + U + "q" + A + "</think>Checking." + expected_block + EOS


def test_tool_call_arguments_that_are_not_a_json_object_are_kept_whole():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call("f", "not json"), call("g", "[1, 2]")]}]
    prompt = encode_messages(msgs, "chat")
    assert f'<{D}invoke name="f">\n<{D}parameter name="arguments" string="true">not json</{D}parameter>' in prompt
    assert f'<{D}invoke name="g">\n<{D}parameter name="arguments" string="true">[1, 2]</{D}parameter>' in prompt


def test_tool_call_arguments_given_as_a_dict_encode_like_the_json_string():
    as_str = [{"role": "user", "content": "q"},
              {"role": "assistant", "content": "", "tool_calls": [call("f", '{"a": 1, "b": "x"}')]}]
    as_dict = copy.deepcopy(as_str)
    as_dict[1]["tool_calls"][0]["function"]["arguments"] = {"a": 1, "b": "x"}
    assert encode_messages(as_dict, "chat") == encode_messages(as_str, "chat")


def test_tool_results_merge_into_one_user_turn_in_call_order():
    msgs = [{"role": "system", "content": "S", "tools": [WEATHER_TOOL]},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "reasoning_content": "r",
             "tool_calls": [call("get_weather", '{"city": "A"}', "id_a"), call("get_weather", '{"city": "B"}', "id_b")]},
            # results arrive out of order; a user remark follows them
            {"role": "tool", "tool_call_id": "id_b", "content": "sunny"},
            {"role": "tool", "tool_call_id": "id_a", "content": "rain"},
            {"role": "user", "content": "and tomorrow?"}]
    prompt = encode_messages(msgs, "thinking")
    assert prompt.endswith(
        EOS + U + "<tool_result>rain</tool_result>\n\n<tool_result>sunny</tool_result>\n\nand tomorrow?" + A + "<think>")
    assert A + "<think>r</think>\n\n<" + D + "tool_calls>" in prompt


def test_tool_result_content_parts_are_joined():
    msgs = [{"role": "tool", "tool_call_id": "x",
             "content": [{"type": "text", "text": "one"}, {"type": "image_url"}, {"type": "text", "text": "two"}]}]
    assert encode_messages(msgs, "chat") == (
        BOS + U + "<tool_result>one\n\n[Unsupported image_url]\n\ntwo</tool_result>" + A + "</think>")


# ------------------------------------------------------------------ effort, tasks, options

def test_max_reasoning_effort_prefixes_the_prompt_in_thinking_mode_only():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert encode_messages(msgs, "thinking", reasoning_effort="max") == BOS + MAX_EFFORT + "S" + U + "q" + A + "<think>"
    assert encode_messages(msgs, "thinking", "high") == encode_messages(msgs, "thinking")
    assert encode_messages(msgs, "chat", reasoning_effort="max") == encode_messages(msgs, "chat")
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages(msgs, "thinking", reasoning_effort="medium")


def test_task_tokens():
    action = [{"role": "user", "content": "hot springs?", "task": "action"}, {"role": "assistant", "content": "Search"}]
    assert encode_messages(action, "chat") == BOS + U + "hot springs?" + A + "</think><｜action｜>Search" + EOS
    # the task answer is never reasoned, even in thinking mode
    assert encode_messages(action, "thinking") == BOS + U + "hot springs?" + A + "<think><｜action｜>Search" + EOS
    query = [{"role": "user", "content": "hot springs?", "task": "query"}]
    assert encode_messages(query, "chat") == BOS + U + "hot springs?<｜query｜>"
    title = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "task": "title"}]
    assert encode_messages(title, "chat") == BOS + U + "hi" + A + "</think>hello" + EOS + "<｜title｜>"


def test_wo_eos_leaves_the_assistant_turn_open_for_prefill():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is", "wo_eos": True}]
    assert encode_messages(msgs, "chat") == BOS + U + "q" + A + "</think>The answer is"


def test_request_level_tools_attach_to_system_or_a_new_one_without_mutating_input():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    snapshot = copy.deepcopy(msgs)
    with_tools = encode_messages(msgs, "chat", tools=[WEATHER_TOOL])
    assert msgs == snapshot
    assert with_tools == encode_messages([dict(msgs[0], tools=[WEATHER_TOOL]), msgs[1]], "chat")
    no_system = encode_messages([{"role": "user", "content": "q"}], "chat", tools=[WEATHER_TOOL])
    tools = TOOLS_BLOCK.replace("{tool_definitions_json}", WEATHER_SCHEMA)
    assert no_system == BOS + "\n\n" + tools + U + "q" + A + "</think>"


def test_context_encodes_only_the_new_part():
    ctx = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
           {"role": "assistant", "content": "a1", "reasoning_content": "r1"}, {"role": "user", "content": "q2"}]
    reply = [{"role": "assistant", "content": "a2", "reasoning_content": "r2"}]
    for mode in ("chat", "thinking"):
        assert encode_messages(ctx, mode) + encode_messages(reply, mode, context=ctx) == encode_messages(ctx + reply, mode)
    assert not encode_messages(reply, "chat", context=ctx).startswith(BOS)


@pytest.mark.parametrize("bad, err", [
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"role": "developer", "content": ""}], "developer"),
    ([{"role": "user", "content": "x", "task": "nope"}], "unknown task"),
    ([{"role": "user", "content": 5}], "content"),
    ([{"role": "system", "content": "", "tools": [{"name": "flat"}]}], "OpenAI-format"),
    ("not a list", "list"),
])
def test_malformed_messages_raise_clear_errors(bad, err):
    with pytest.raises((ValueError, TypeError), match=err):
        encode_messages(bad, "chat")
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages([{"role": "user", "content": "x"}], "deep")


def test_special_tokens_cover_everything_the_encoder_emits():
    msgs = [{"role": "system", "content": "S", "tools": [WEATHER_TOOL]},
            {"role": "latest_reminder", "content": "today"},
            {"role": "user", "content": "q", "task": "action"}, {"role": "assistant", "content": "Search"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [call("get_weather", '{"city": "X"}')]},
            {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "done", "task": "title"}]
    prompt = encode_messages(msgs, "thinking", "max")
    for tok in (BOS, EOS, U, A, "<think>", "</think>", D, "<｜latest_reminder｜>", "<｜action｜>", "<｜title｜>"):
        assert tok in cf.SPECIAL_TOKENS and tok in prompt
    stripped = prompt
    for tok in sorted(cf.SPECIAL_TOKENS, key=len, reverse=True):
        stripped = stripped.replace(tok, "")
    assert "｜" not in stripped and "<think>" not in stripped and "</think>" not in stripped
    assert len(set(cf.SPECIAL_TOKENS)) == len(cf.SPECIAL_TOKENS)


# ------------------------------------------------------------------ parsing

def test_parse_readme_example():
    assert parse_completion("Simple arithmetic.</think>2 + 2 = 4." + EOS, "thinking") == {
        "role": "assistant", "content": "2 + 2 = 4.", "reasoning_content": "Simple arithmetic.", "tool_calls": []}
    assert parse_completion("Hello!" + EOS, "chat") == {
        "role": "assistant", "content": "Hello!", "reasoning_content": "", "tool_calls": []}


@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("content", ["", "Let me check.", "ends with a blank line\n\n", "多行\n内容"])
def test_encode_then_parse_round_trip_with_tool_calls(mode, content):
    args1 = json.dumps({"city": "Zürich", "days": 2, "alerts": False, "extra": {"a": [1, None]}}, ensure_ascii=False)
    reply = {"role": "assistant", "content": content, "reasoning_content": "I should call tools." if mode == "thinking" else "",
             "tool_calls": [call("get_weather", args1), call("get_weather", json.dumps({"city": "Oslo\n\"quoted\""}))]}
    head = [{"role": "system", "content": "S", "tools": [WEATHER_TOOL]}, {"role": "user", "content": "weather?"}]
    prompt = encode_messages(head, mode)
    full = encode_messages(head + [reply], mode)
    assert full.startswith(prompt)
    parsed = parse_completion(full[len(prompt):], mode)
    assert parsed["content"] == content
    assert parsed["reasoning_content"] == reply["reasoning_content"]
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == ["get_weather", "get_weather"]
    assert [json.loads(c["function"]["arguments"]) for c in parsed["tool_calls"]] == [
        json.loads(c["function"]["arguments"]) for c in reply["tool_calls"]]
    # Feeding the parsed message back reproduces the same prompt (what a multi-turn client does).
    assert encode_messages(head + [parsed], mode) == full


def test_parse_without_eos_and_ignores_text_after_eos():
    assert parse_completion("partial answer", "chat")["content"] == "partial answer"
    assert parse_completion("answer" + EOS + "garbage", "chat")["content"] == "answer"


def test_parse_thinking_without_end_tag_is_all_reasoning():
    out = parse_completion("still thinking about it", "thinking")
    assert out["reasoning_content"] == "still thinking about it" and out["content"] == "" and out["tool_calls"] == []


def test_parse_unterminated_dsml_block_stays_content():
    text = f"Sure.\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"x\" string=\"true\">1"
    out = parse_completion(text, "chat")
    assert out["content"] == text and out["tool_calls"] == []


def test_parse_malformed_dsml_block_stays_content():
    text = f"\n\n<{D}tool_calls>\n<{D}invoke>\n</{D}invoke>\n</{D}tool_calls>" + EOS  # invoke without a name
    out = parse_completion(text, "chat")
    assert out["content"] == text[: -len(EOS)] and out["tool_calls"] == []


def test_parse_non_json_value_marked_non_string_becomes_a_string():
    text = (f"\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"n\" string=\"false\">12</{D}parameter>\n"
            f"<{D}parameter name=\"bad\" string=\"false\">not json</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>")
    (tc,) = parse_completion(text, "chat")["tool_calls"]
    assert json.loads(tc["function"]["arguments"]) == {"n": 12, "bad": "not json"}


def test_json_nested_past_the_recursion_limit_is_text_not_a_crash():
    """json.loads raises RecursionError (not ValueError) for ~1,000 nested brackets: a model stuck
    on "[" in a parameter, or a client's tool-call arguments nested that deep, used to crash the
    parser and the encoder (a 500 in the server). Both now take it as text that is not JSON."""
    deep = "[" * 3000 + "]" * 3000
    with pytest.raises(RecursionError):  # the premise: json itself gives up
        json.loads(deep)
    text = (f"\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"x\" string=\"false\">{deep}"
            f"</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>")
    (tc,) = parse_completion(text, "chat")["tool_calls"]
    assert tc["function"]["arguments"] == json.dumps({"x": deep})    # the value kept whole, as a string
    args = '{"a": ' + deep + "}"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call("f", args)]}]
    assert f'<{D}parameter name="arguments" string="true">{args}</{D}parameter>' in encode_messages(msgs, "chat")


def test_parse_keeps_text_after_a_tool_block():
    text = f"A\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n\n</{D}invoke>\n</{D}tool_calls> trailing" + EOS
    out = parse_completion(text, "chat")
    assert out["content"] == "A trailing"
    assert out["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]


def test_parse_never_raises_on_any_prefix_or_mutation_of_model_text():
    head = [{"role": "system", "content": "S", "tools": [WEATHER_TOOL]}, {"role": "user", "content": "q"}]
    reply = {"role": "assistant", "content": "c", "reasoning_content": "r",
             "tool_calls": [call("get_weather", '{"city": "X", "n": [1, 2]}')]}
    text = encode_messages(head + [reply], "thinking")[len(encode_messages(head, "thinking")):]
    pieces = ["</think>", "<think>", f"<{D}tool_calls>", f"</{D}invoke>", f"</{D}parameter>", '"', ">", EOS]
    variants = [text[:i] for i in range(len(text) + 1)]
    variants += [text[:i] + p + text[i:] for i in range(0, len(text), 7) for p in pieces]
    variants += [text[:i] + text[i + 5:] for i in range(0, len(text), 3)]
    for mode in ("chat", "thinking"):
        for v in variants:
            out = parse_completion(v, mode)
            assert set(out) == {"role", "content", "reasoning_content", "tool_calls"}
            assert isinstance(out["content"], str) and isinstance(out["reasoning_content"], str)
            for tc in out["tool_calls"]:
                assert isinstance(json.loads(tc["function"]["arguments"]), dict)
    # the complete text still parses to the tool call
    assert parse_completion(text, "thinking")["tool_calls"][0]["function"]["name"] == "get_weather"


def test_cli_prints_the_prompt(tmp_path, capsys):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "thinking_mode": "thinking"}))
    assert cf.main([str(path)]) == 0
    assert capsys.readouterr().out == BOS + U + "hi" + A + "<think>"
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "robot"}]')
    assert cf.main([str(bad)]) == 1
    assert "unknown role" in capsys.readouterr().err


# ------------------------------------------------------------------ pieces, ids and the loss mask

class CharTokenizer:
    """A stand-in tokenizer: one id per character (offset past the specials), specials mapped
    from their literal strings. encode() treats special strings as text, as the real one does."""

    SPECIALS = [BOS, EOS, U, A, "<｜latest_reminder｜>", "<think>", "</think>", D, "<｜action｜>", "<｜query｜>",
                "<｜authority｜>", "<｜domain｜>", "<｜title｜>", "<｜read_url｜>", "<｜extracted_url｜>"]

    def __init__(self, missing=()):
        self.special_tokens = {s: k for k, s in enumerate(self.SPECIALS) if s not in missing}

    def encode(self, text):
        return [1000 + ord(c) for c in text]

    def decode(self, ids):
        return "".join(self.SPECIALS[i] if i < 1000 else chr(i - 1000) for i in ids)


def _all_features_conversation():
    return [{"role": "system", "content": "S <｜User｜>", "tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}},
            {"role": "latest_reminder", "content": "today"},
            {"role": "user", "content": "q", "task": "action"}, {"role": "assistant", "content": "Search"},
            {"role": "user", "content": "q2 </think>"},
            {"role": "assistant", "content": "", "reasoning_content": "r",
             "tool_calls": [call("get_weather", '{"city": "X"}', "c1")]},
            {"role": "tool", "content": "ok", "tool_call_id": "c1"},
            {"role": "assistant", "content": "done", "task": "title"}]


def test_pieces_join_to_the_prompt_and_are_canonical():
    convs = [_all_features_conversation(),
             [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
              {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a", "wo_eos": True}]]
    for msgs in convs:
        for mode in ("chat", "thinking"):
            for effort in (None, "max"):
                pieces = cf.encode_pieces(msgs, mode, effort)
                assert "".join(p.text for p in pieces) == encode_messages(msgs, mode, effort)
                assert all(p.text for p in pieces)
                assert all(p.text in CharTokenizer.SPECIALS for p in pieces if p.special)
                for a, b in zip(pieces, pieces[1:]):  # text runs of one flag are one piece
                    assert a.special or b.special or a.trainable != b.trainable


def test_encode_ids_masks_prefix_system_tools_and_response_format():
    tok = CharTokenizer()
    msgs = [{"role": "system", "content": "S", "response_format": {"type": "json_object"}},
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]
    ids, mask = cf.encode_ids(msgs, tok, "thinking", "max", tools=[WEATHER_TOOL])
    assert tok.decode(ids) == encode_messages(msgs, "thinking", "max", tools=[WEATHER_TOOL])
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "r</think>a" + EOS
    assert tok.decode(ids[:1 + len(MAX_EFFORT)]) == BOS + MAX_EFFORT and not any(mask[:ids.index(2)])


def test_encode_ids_message_text_never_becomes_special_ids():
    tok = CharTokenizer()
    ids, _ = cf.encode_ids(_all_features_conversation(), tok, "thinking")
    specials = [tok.SPECIALS[i] for i in ids if i < 1000]
    # system "<｜User｜>" and user "</think>" are text: only the structure's specials remain
    assert specials.count(U) == 3 and specials.count("</think>") == 2 + 2
    assert tok.decode(ids) == encode_messages(_all_features_conversation(), "thinking")


def test_pieces_to_ids_needs_every_special_token():
    with pytest.raises(LookupError, match="DSML"):
        cf.encode_ids([{"role": "user", "content": "q"}], CharTokenizer(missing=(D,)), tools=[WEATHER_TOOL])
