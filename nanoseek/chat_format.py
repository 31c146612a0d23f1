"""DeepSeek-V4 chat encoding: OpenAI-style messages <-> the exact prompt string the model reads.

Implements the prompt format of the official DeepSeek-V4 release (its `encoding/` folder:
README, reference encoder and test vectors). The goal is byte identity with that encoder, because a
model only behaves as trained when it sees the very same bytes (and therefore tokens) it was trained
on. Entry points:

    encode_messages(messages, thinking_mode="chat"|"thinking", reasoning_effort=None)  -> prompt str
    encode_ids(messages, tokenizer, thinking_mode, ...)  -> (token ids, loss mask)
    encode_pieces(messages, thinking_mode, ...)  -> [Piece(text, special, trainable), ...]
    parse_completion(text, thinking_mode)  -> {"role", "content", "reasoning_content", "tool_calls"}
    ChatStreamSplitter(thinking_mode)  -> streamed reasoning/content deltas that add up to parse_completion

There is one renderer, encode_pieces: it knows which spans are the format's own special tokens
and which are message text (always text, even when it spells a special token: tokenize with
encode_ids, never by allowing special tokens in the prompt string), and which spans the assistant
generates (the SFT loss mask). encode_messages joins the pieces' text.

The format in one picture (chat mode closes the think block right away, thinking mode opens it):

    <｜begin▁of▁sentence｜>{system}[\\n\\n## Tools ...]
    <｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>
    <｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{answer}\\n\\n<｜DSML｜tool_calls>...<｜end▁of▁sentence｜>
    <｜User｜><tool_result>{result}</tool_result><｜Assistant｜><think>...

(no newlines between turns; they are drawn here for reading). See docs/chat_format.md for every
rule, and the deliberate deviations (all on input the official encoder rejects or crashes on).

Run: `python -m nanoseek.chat_format conversation.json [--thinking-mode thinking] [--reasoning-effort max]`
prints the prompt for a JSON file holding a message list or {"messages", "thinking_mode", ...}.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import re
import sys
from typing import Any, NamedTuple

# --------------------------------------------------------------------------------------------
# Special tokens. Each of these strings is a single token in the DeepSeek vocabulary; the
# tokenizer must map them to one id each (and never split them), or the encoded prompt is not
# what the model was trained on.
# --------------------------------------------------------------------------------------------
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"  # the markup token inside tool-call tags: <｜DSML｜invoke ...>

# Quick-instruction task tokens: a message's "task" field appends one of these to trigger a
# short auxiliary output (routing, title, search query, ...). Internal to DeepSeek's app, kept
# so that prompts with tasks encode exactly.
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
# Not emitted by the encoder itself: the caller writes it inside user text before a URL whose
# <｜read_url｜> decision is asked for. Listed so the tokenizer covers it.
EXTRACTED_URL = "<｜extracted_url｜>"

# Not part of the chat format but special tokens of the same vocabulary (DeepSeek's strings):
# padding and fill-in-the-middle (PSM: <BOS><｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>{middle}).
PAD = "<｜▁pad▁｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"

# The one definition of the special-token vocabulary: (name, string) in id order. BOS = 0 and
# EOS = 1 as in DeepSeek-V4's config.json; ids 19-31 are reserved placeholders so that a later
# special token never shifts the ordinary vocabulary. nanoseek.data.tokenizer trains with it.
VOCABULARY_SPECIALS: tuple[tuple[str, str], ...] = (
    ("bos", BOS), ("eos", EOS), ("pad", PAD), ("user", USER), ("assistant", ASSISTANT),
    ("latest_reminder", LATEST_REMINDER), ("think_begin", THINK_START), ("think_end", THINK_END), ("dsml", DSML),
    ("fim_begin", FIM_BEGIN), ("fim_hole", FIM_HOLE), ("fim_end", FIM_END),
    ("action", TASK_TOKENS["action"]), ("query", TASK_TOKENS["query"]), ("authority", TASK_TOKENS["authority"]),
    ("domain", TASK_TOKENS["domain"]), ("title", TASK_TOKENS["title"]), ("extracted_url", EXTRACTED_URL),
    ("read_url", TASK_TOKENS["read_url"]),
) + tuple((f"placeholder_{i}", f"<｜place▁holder▁no▁{i}｜>") for i in range(19, 32))

# Every special-token string this format can put into a prompt or expect in a completion, for
# tokenizer coverage checks.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, EOS, USER, ASSISTANT, LATEST_REMINDER, THINK_START, THINK_END, DSML,
    *TASK_TOKENS.values(), EXTRACTED_URL,
)

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")
ROLES = ("system", "user", "assistant", "developer", "latest_reminder", "tool")

# Roles after which the assistant prefix is not written yet: a reply (or a reminder that sits
# between a user turn and the reply) follows directly.
_ROLES_CONTINUING_A_TURN = ("assistant", "latest_reminder")

_TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
_TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
_INVOKE_CLOSE = f"</{DSML}invoke>"
_PARAM_CLOSE = f"</{DSML}parameter>"

# Prepended (in thinking mode only) to the very start of the prompt for reasoning_effort="max";
# "high" is the default thinking behaviour and adds nothing.
MAX_EFFORT_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n"
)


def _json(value: Any) -> str:
    # ensure_ascii=False: the model saw raw UTF-8 (e.g. Chinese) in schemas and arguments, not
    # \\uXXXX escapes; default separators (", " and ": ") are part of the format too.
    return json.dumps(value, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Pieces: the encoding as a list of spans that know what they are. A special piece is one
# special-token string written by the format itself (role tokens, think tags, DSML markup, ...);
# every other span is text, and message content is always text, even when it spells a special
# token, so a user can never forge a control token. `trainable` marks what the assistant writes.
# --------------------------------------------------------------------------------------------

class Piece(NamedTuple):
    """One span of an encoded conversation.

    text: the exact characters (the encoded prompt is the concatenation of all pieces' text).
    special: True for a single special-token string written by the format's own structure; it
        must become exactly one token id. False for text, tokenized with special strings as text.
    trainable: True for what the model generates in an assistant turn (reasoning, `</think>`,
        answer, tool-call block, EOS); False for everything it reads (the loss mask).
    """

    text: str
    special: bool = False
    trainable: bool = False


# Longest first, so that no special string is matched as a part of a longer one.
_SPECIAL_SPLIT = re.compile("(" + "|".join(map(re.escape, sorted(SPECIAL_TOKENS, key=len, reverse=True))) + ")")


@functools.lru_cache(maxsize=256)
def _template(fixed: str) -> tuple[Piece, ...]:
    """Pieces of a fixed string of the format (never message content): its special-token
    strings are special pieces, the rest text. Cached: only a few dozen such strings exist."""
    # re.split with one capture group: odd positions are the separators (the special strings).
    return tuple(Piece(part, k % 2 == 1) for k, part in enumerate(_SPECIAL_SPLIT.split(fixed)) if part)


def _special(token: str) -> Piece:
    return Piece(token, special=True)


def _join(pieces: list[Piece]) -> str:
    return "".join(p.text for p in pieces)


_TOOLS_INTRO = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke "
    f'tools by writing a "{_TOOL_CALLS_OPEN}" block like the following:\n\n'
    f"{_TOOL_CALLS_OPEN}\n"
    f'<{DSML}invoke name="$TOOL_NAME">\n'
    f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{_PARAM_CLOSE}\n'
    "...\n"
    f"{_INVOKE_CLOSE}\n"
    f'<{DSML}invoke name="$TOOL_NAME2">\n'
    "...\n"
    f"{_INVOKE_CLOSE}\n"
    f"{_TOOL_CALLS_CLOSE}\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types '
    "(numbers, booleans, arrays, objects), pass the value in JSON format and set "
    '`string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete "
    f"reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
_TOOLS_OUTRO = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"


def _tools_block_pieces(tools: list[dict[str, Any]]) -> list[Piece]:
    # The instructions are the format's own (their <think>/</think>/DSML are tokens); the
    # schemas are caller data, hence text.
    schemas = "\n".join(_json(_function_of(tool)) for tool in tools)
    return [*_template(_TOOLS_INTRO), Piece(schemas), *_template(_TOOLS_OUTRO)]


def render_tools_block(tools: list[dict[str, Any]]) -> str:
    """The `## Tools` section for OpenAI-format tools ({"type": "function", "function": {...}})."""
    return _join(_tools_block_pieces(tools))


def _function_of(tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
        raise ValueError(f"tools must be OpenAI-format {{'type': 'function', 'function': {{...}}}}, got {tool!r}")
    return tool["function"]


def _tool_call_pieces(tool_calls: list[dict[str, Any]]) -> list[Piece]:
    """The DSML block (with the blank line before it): markup from templates, names and
    values as text."""
    out = list(_template(f"\n\n{_TOOL_CALLS_OPEN}\n"))
    for n, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or "name" not in fn:
            raise ValueError(f"tool_calls entries must look like {{'function': {{'name', 'arguments'}}}}, got {call!r}")
        if n:
            out.append(Piece("\n"))
        out += [*_template(f'<{DSML}invoke name="'), Piece(f"{fn['name']}"), *_template('">\n')]
        for k, (key, value) in enumerate(_arguments_dict(fn.get("arguments")).items()):
            is_string = isinstance(value, str)
            out += [Piece("\n")] if k else []
            out += [*_template(f'<{DSML}parameter name="'), Piece(f"{key}"),
                    *_template(f'" string="{"true" if is_string else "false"}">'),
                    Piece(value if is_string else _json(value)), *_template(_PARAM_CLOSE)]
        out += _template(f"\n{_INVOKE_CLOSE}")
    return [*out, *_template(f"\n{_TOOL_CALLS_CLOSE}")]


def render_tool_calls(tool_calls: list[dict[str, Any]]) -> str:
    """The DSML block for OpenAI-format tool calls, including the blank line that precedes it."""
    return _join(_tool_call_pieces(tool_calls))


def _arguments_dict(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments as a dict of parameters.

    OpenAI sends a JSON string. A string that is not a JSON object is kept whole as one string
    parameter named "arguments" (the official fallback), so nothing the client sent is lost.
    """
    if arguments is None:
        return {}
    if isinstance(arguments, dict):  # some clients send the object itself
        return arguments
    if not isinstance(arguments, str):
        raise TypeError(f"tool call arguments must be a JSON string, got {type(arguments).__name__}")
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):  # (nested past json's recursion limit: not parsed either)
        parsed = None
    return parsed if isinstance(parsed, dict) else {"arguments": arguments}


def _text(content: Any, where: str) -> str:
    """Message content as text: a string, None (empty), or a list of OpenAI content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # The official rule for tool results that are part lists: text parts joined by a blank
        # line, anything else (images, ...) replaced by a visible placeholder.
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            parts.append(str(part.get("text", "")) if kind == "text" else f"[Unsupported {kind}]")
        return "\n\n".join(parts)
    raise TypeError(f"{where}: content must be a string, a list of content parts or null, "
                    f"got {type(content).__name__}")


# --------------------------------------------------------------------------------------------
# Preprocessing: V4 has no tool role. Tool results become <tool_result> blocks of a user turn,
# and consecutive user-side messages fold into one turn whose blocks are joined by "\n\n".
# --------------------------------------------------------------------------------------------

def _check_messages(messages: Any, name: str) -> None:
    if not isinstance(messages, list):
        raise TypeError(f"{name} must be a list of message dicts, got {type(messages).__name__}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise TypeError(f"{name}[{i}] must be a dict, got {type(msg).__name__}")
        if msg.get("role") not in ROLES:
            raise ValueError(f"{name}[{i}]: unknown role {msg.get('role')!r}; expected one of {ROLES}")
        task = msg.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise ValueError(f"{name}[{i}]: unknown task {task!r}; expected one of {sorted(TASK_TOKENS)}")
        if msg["role"] == "developer" and not msg.get("content"):
            raise ValueError(f"{name}[{i}]: a developer message needs non-empty content")


def _fold_user_side(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn tool messages into user turns of blocks; merge a user/tool message into the user turn
    before it unless that turn carries a task."""
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "tool":
            block = {"kind": "tool_result", "id": msg.get("tool_call_id") or "",
                     "text": _text(msg.get("content"), f"message {i} (tool)")}
            if out and out[-1]["role"] == "user":
                # Official quirk kept for byte identity: tool results join the previous user
                # turn even when that turn has a task.
                out[-1]["blocks"].append(block)
            else:
                out.append({"role": "user", "blocks": [block]})
        elif role == "user":
            block = {"kind": "text", "text": _text(msg.get("content"), f"message {i} (user)")}
            if out and out[-1]["role"] == "user" and out[-1].get("task") is None:
                out[-1]["blocks"].append(block)  # this message's own task/wo_eos are dropped
            else:
                turn = {"role": "user", "blocks": [block]}
                for key in ("task", "wo_eos"):
                    if key in msg:
                        turn[key] = msg[key]
                out.append(turn)
        else:
            out.append(copy.deepcopy(msg))
    return out


def _order_tool_results(messages: list[dict[str, Any]]) -> None:
    """Sort each user turn's tool results into the order of the calls of the latest assistant
    message that made calls (by tool_call id); text blocks keep their slots. In place."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            order = {}
            for pos, call in enumerate(msg["tool_calls"]):
                if not isinstance(call, dict):
                    continue  # (a malformed call is refused with a ValueError when it is rendered)
                fn = call.get("function")
                call_id = call.get("id") or (fn.get("id") if isinstance(fn, dict) else None) or ""
                if call_id:
                    order[call_id] = pos
        elif msg["role"] == "user" and order:
            results = [b for b in msg["blocks"] if b["kind"] == "tool_result"]
            if len(results) > 1:
                # Stable sort; an id that matches no call sorts as position 0 (official rule).
                ranked = iter(sorted(results, key=lambda b: order.get(b["id"], 0)))
                msg["blocks"] = [next(ranked) if b["kind"] == "tool_result" else b for b in msg["blocks"]]


def _last_user_index(messages: list[dict[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] in ("user", "developer"):
            return i
    return -1


def _drop_old_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Before the last user turn: strip assistant reasoning and drop developer messages (they
    are per-request instructions that have served their purpose)."""
    last_user = _last_user_index(messages)
    out = []
    for i, msg in enumerate(messages):
        if i >= last_user or msg["role"] in ("user", "system", "latest_reminder"):
            out.append(msg)
        elif msg["role"] == "assistant":
            out.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return out


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_RESPONSE_FORMAT_INTRO = "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


def _extras(msg: dict[str, Any]) -> list[Piece]:
    """The tools block and response-format section a system/developer message carries."""
    out: list[Piece] = []
    if msg.get("tools"):
        out += [Piece("\n\n"), *_tools_block_pieces(msg["tools"])]
    if msg.get("response_format"):
        out += [Piece(_RESPONSE_FORMAT_INTRO), Piece(_json(msg["response_format"]))]
    return out


def _assistant(i: int, msgs: list[dict[str, Any]], thinking: bool, keep_reasoning: bool,
               last_user: int) -> list[Piece]:
    """What the model writes for assistant message i, all trainable. Its <think> opener (or the
    </think> closing an empty think block) was written by the turn before it: prompt, not reply."""
    msg = msgs[i]
    out: list[Piece] = []
    # A reply to a task token is a bare short answer, never reasoned.
    after_task = i > 0 and msgs[i - 1].get("task") is not None
    if thinking and not after_task and (keep_reasoning or i > last_user):
        reasoning = msg.get("reasoning_content") or ""
        if not isinstance(reasoning, str):
            raise TypeError(f"assistant reasoning_content must be a string or null, got {type(reasoning).__name__}")
        out += [Piece(reasoning), _special(THINK_END)]
    out.append(Piece(_text(msg.get("content"), "assistant")))
    if msg.get("tool_calls"):
        out += _tool_call_pieces(msg["tool_calls"])
    if not msg.get("wo_eos"):
        out.append(_special(EOS))
    return [Piece(p.text, p.special, True) for p in out]


def _body(i: int, msgs: list[dict[str, Any]], thinking: bool, keep_reasoning: bool,
          last_user: int) -> list[Piece]:
    """Message i itself: its role token (if any) and its content."""
    msg = msgs[i]
    role = msg["role"]
    if role == "system":  # no role token: the system prompt follows BOS directly
        return [Piece(_text(msg.get("content"), "system")), *_extras(msg)]
    if role == "developer":  # rendered as a user turn carrying the tools
        return [_special(USER), Piece(_text(msg.get("content"), "developer")), *_extras(msg)]
    if role == "user":
        blocks = [b["text"] if b["kind"] == "text" else f"<tool_result>{b['text']}</tool_result>"
                  for b in msg["blocks"]]
        return [_special(USER), Piece("\n\n".join(blocks))]
    if role == "latest_reminder":
        return [_special(LATEST_REMINDER), Piece(_text(msg.get("content"), "latest_reminder"))]
    return _assistant(i, msgs, thinking, keep_reasoning, last_user)


def _after(i: int, msgs: list[dict[str, Any]], thinking: bool, keep_reasoning: bool,
           last_user: int) -> list[Piece]:
    """What follows message i: nothing yet if another user-side message follows (it continues
    the prompt); otherwise the task token, or the assistant prefix with the think opener/closer.
    Always prompt (the generation prompt of the next reply, or a task trigger the app writes)."""
    msg = msgs[i]
    if i + 1 < len(msgs) and msgs[i + 1]["role"] not in _ROLES_CONTINUING_A_TURN:
        return []
    task = msg.get("task")
    if task == "action":
        return [_special(ASSISTANT), _special(THINK_START if thinking else THINK_END), _special(TASK_TOKENS[task])]
    if task is not None:
        return [_special(TASK_TOKENS[task])]
    if msg["role"] in ("user", "developer"):
        opens_thinking = thinking and (keep_reasoning or i >= last_user)
        return [_special(ASSISTANT), _special(THINK_START if opens_thinking else THINK_END)]
    return []


def _render(i: int, msgs: list[dict[str, Any]], thinking: bool, keep_reasoning: bool,
            last_user: int, reasoning_effort: str | None) -> list[Piece]:
    out = [Piece(MAX_EFFORT_PREFIX)] if (i == 0 and thinking and reasoning_effort == "max") else []
    return (out + _body(i, msgs, thinking, keep_reasoning, last_user)
            + _after(i, msgs, thinking, keep_reasoning, last_user))


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Canonical form: no empty pieces, and adjacent text pieces with the same trainable flag
    joined into one, so that each text piece is one tokenizer call (tokens may span the
    boundaries between, e.g., an answer and its tool-call markup, as in the whole string)."""
    out: list[Piece] = []
    run: list[str] = []
    run_trainable = False

    def flush() -> None:
        if run:
            out.append(Piece("".join(run), False, run_trainable))
            run.clear()

    for p in pieces:
        if not p.text:
            continue
        if p.special or p.trainable != run_trainable:
            flush()
        if p.special:
            out.append(p)
        else:
            run.append(p.text)
            run_trainable = p.trainable
    flush()
    return out


def _attach_request_options(messages: list[dict[str, Any]], tools: Any, response_format: Any
                            ) -> list[dict[str, Any]]:
    """OpenAI puts tools/response_format on the request; V4 wants them on a system or developer
    message. Attach them to a leading system/developer message (replacing its own), or insert an
    empty system message carrying them. Never mutates the caller's list."""
    if not tools and not response_format:
        return messages
    messages = list(messages)
    if messages and isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer"):
        head = dict(messages[0])
    else:
        head = {"role": "system", "content": ""}
        messages.insert(0, head)
    if tools:
        head["tools"] = tools
    if response_format:
        head["response_format"] = response_format
    messages[0] = head
    return messages


def _prepare(messages: Any, context: Any, tools: Any, response_format: Any, drop_thinking: bool,
             thinking: bool) -> tuple[list[dict[str, Any]], int, bool, bool]:
    """Validate and preprocess: (all messages ready to render, index of the first one to
    render, keep_reasoning, whether there is a context)."""
    context = context or []
    _check_messages(messages, "messages")
    _check_messages(context, "context")
    # Request-level options belong to the head of the conversation, which is the context when
    # one is given (already encoded there; here they only switch reasoning retention).
    if context:
        context = _attach_request_options(context, tools, response_format)
    else:
        messages = _attach_request_options(messages, tools, response_format)

    # Tool results are ordered with the context in view (the calls may be in the context).
    new = _fold_user_side(messages)
    ctx = _fold_user_side(context)
    _order_tool_results(ctx + new)
    full = ctx + new

    # Tool-using conversations keep all reasoning: the model needs its earlier reasoning to
    # follow a multi-step tool plan.
    keep_reasoning = not drop_thinking or any(m.get("tools") for m in full)
    first = len(ctx)
    if thinking and not keep_reasoning:
        # Matches the official bookkeeping exactly: the context's pruned length is computed on
        # the context alone.
        full = _drop_old_reasoning(full)
        first = len(_drop_old_reasoning(ctx))
    return full, first, keep_reasoning, bool(ctx)


def encode_pieces(
    messages: list[dict[str, Any]],
    thinking_mode: str = "chat",
    reasoning_effort: str | None = None,
    *,
    tools: list[dict[str, Any]] | None = None,
    response_format: dict[str, Any] | None = None,
    context: list[dict[str, Any]] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
) -> list[Piece]:
    """The encoding of `messages` as a list of Pieces (the one renderer: encode_messages joins
    these). Arguments and errors as for encode_messages.

    Special pieces are exactly the special-token strings the format's structure writes: BOS,
    role tokens, think tags, EOS, task tokens, and the DSML tokens of tool-call markup and of the
    tools block's fixed instructions. Message content (system, user, assistant content and
    reasoning, tool results, tool names, argument names and values, tool schemas, response
    formats) is text, whatever it spells. Adjacent text pieces with the same trainable flag are
    merged, and no piece is empty.

    Trainable pieces are what the model generates in each assistant turn as rendered: the
    reasoning and its `</think>` (when the encoding keeps that turn's reasoning), the content,
    the tool-call block and the EOS (absent with "wo_eos"). Everything else is read, not
    written: BOS, the max-effort prefix, system/developer/user/reminder turns, tool results, the
    tools block, the generation prompt `<｜Assistant｜>` plus the `<think>` or `</think>` after it,
    and task tokens (the application writes a task token to ask for a short answer; that answer
    and its EOS are trainable like any reply).
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    thinking = thinking_mode == "thinking"
    full, first, keep_reasoning, has_ctx = _prepare(messages, context, tools, response_format,
                                                    drop_thinking, thinking)
    last_user = _last_user_index(full)
    pieces = [_special(BOS)] if add_default_bos_token and not has_ctx else []
    for i in range(first, len(full)):
        pieces += _render(i, full, thinking, keep_reasoning, last_user, reasoning_effort)
    return _merged(pieces)


def encode_messages(
    messages: list[dict[str, Any]],
    thinking_mode: str = "chat",
    reasoning_effort: str | None = None,
    *,
    tools: list[dict[str, Any]] | None = None,
    response_format: dict[str, Any] | None = None,
    context: list[dict[str, Any]] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
) -> str:
    """Encode OpenAI-style messages into the DeepSeek-V4 prompt string.

    messages: dicts with "role" in ROLES and "content"; assistant messages may carry
        "reasoning_content" and OpenAI "tool_calls"; system/developer messages may carry OpenAI
        "tools" and "response_format"; tool messages "tool_call_id"; any message a "task"
        (TASK_TOKENS) and assistant messages "wo_eos" (leave the turn open, for prefilling).
    thinking_mode: "chat" (answer directly) or "thinking" (reason inside <think>...</think>).
    reasoning_effort: None, "high" (same as None) or "max" (prepends MAX_EFFORT_PREFIX; thinking
        mode only).
    tools / response_format: request-level options (OpenAI style), attached to the leading
        system/developer message or to an inserted empty system message.
    context: messages already encoded before `messages` (returns only the new part, no BOS).
    drop_thinking: strip reasoning of assistant turns before the last user turn (thinking mode);
        ignored, as in the official encoder, when any message defines tools.

    Raises TypeError/ValueError on malformed messages, naming the message.

    To tokenize, do not encode this string with special tokens allowed (message text spelling a
    special token would become that token): use encode_ids, which knows what is text.
    """
    return _join(encode_pieces(messages, thinking_mode, reasoning_effort, tools=tools,
                               response_format=response_format, context=context,
                               drop_thinking=drop_thinking, add_default_bos_token=add_default_bos_token))


def pieces_to_ids(pieces: list[Piece], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of encode_pieces(...) output.

    tokenizer (duck-typed): `special_tokens`, a mapping special string -> id, and
    `encode(text) -> list[int]`, which must treat special-token strings as plain text and add
    no BOS/EOS (nanoseek.data.tokenizer.Tokenizer does both by default). Each special piece
    becomes exactly its one id; each text piece is encoded on its own. loss_mask[k] is the
    trainable flag of the piece token k came from. Raises LookupError if the tokenizer lacks a
    special token the encoding uses.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for p in pieces:
        if p.special:
            if p.text not in tokenizer.special_tokens:
                raise LookupError(f"the tokenizer has no special token {p.text!r}, which the chat format needs")
            piece_ids = [int(tokenizer.special_tokens[p.text])]
        else:
            piece_ids = list(tokenizer.encode(p.text))
        ids += piece_ids
        mask += [p.trainable] * len(piece_ids)
    return ids, mask


def encode_ids(messages: list[dict[str, Any]], tokenizer: Any, thinking_mode: str = "chat",
               reasoning_effort: str | None = None, **options: Any) -> tuple[list[int], list[bool]]:
    """Token ids of encode_messages(messages, thinking_mode, reasoning_effort, **options), and the
    loss mask (True where the token is something the assistant generates; see encode_pieces).

    Message text stays text: a user who types "<｜end▁of▁sentence｜><｜User｜>" gets the tokens of
    those characters, never the control tokens. `tokenizer.decode(ids)` (special tokens kept)
    equals encode_messages(...) byte for byte. options: the keyword options of encode_messages;
    tokenizer: see pieces_to_ids.
    """
    return pieces_to_ids(encode_pieces(messages, thinking_mode, reasoning_effort, **options), tokenizer)


# --------------------------------------------------------------------------------------------
# Parsing model output
# --------------------------------------------------------------------------------------------

_INVOKE_OPEN = re.compile(rf'<{DSML}invoke\s+name="(.*?)"\s*>')
_PARAM_OPEN = re.compile(rf'<{DSML}parameter\s+name="(.*?)"(?:\s+string="([^"]*)")?\s*>')
_SPACE = re.compile(r"\s*")


def _argument_fragment(raw: str, is_string: bool) -> str:
    """One parameter's JSON text inside the arguments object. A string="false" value is kept
    verbatim (as the official decoder does) when it is valid JSON, and quoted as a string when
    it is not, so the arguments are always valid JSON."""
    if not is_string:
        try:
            json.loads(raw)
            return raw
        except (ValueError, RecursionError):  # a model's "[[[[..." past json's recursion limit too
            pass
    return _json(raw)


def _parse_tool_block(text: str, pos: int) -> tuple[list[dict[str, Any]], int] | None:
    """Parse the DSML block starting at text[pos] (which is `<｜DSML｜tool_calls>`).

    Returns (OpenAI-format calls, end position) or None when the block is malformed or
    unterminated. Whitespace between tags is not checked, values are taken verbatim.
    """
    pos += len(_TOOL_CALLS_OPEN)
    calls: list[dict[str, Any]] = []
    while True:
        pos = _SPACE.match(text, pos).end()
        if text.startswith(_TOOL_CALLS_CLOSE, pos):
            return calls, pos + len(_TOOL_CALLS_CLOSE)
        invoke = _INVOKE_OPEN.match(text, pos)
        if invoke is None:
            return None
        pos = invoke.end()
        fragments: dict[str, str] = {}  # a repeated parameter: the last value wins
        while True:
            pos = _SPACE.match(text, pos).end()
            if text.startswith(_INVOKE_CLOSE, pos):
                pos += len(_INVOKE_CLOSE)
                break
            param = _PARAM_OPEN.match(text, pos)
            if param is None:
                return None
            end = text.find(_PARAM_CLOSE, param.end())
            if end < 0:
                return None
            fragments[param.group(1)] = _argument_fragment(text[param.end():end], param.group(2) != "false")
            pos = end + len(_PARAM_CLOSE)
        arguments = "{" + ", ".join(f"{_json(k)}: {v}" for k, v in fragments.items()) + "}"
        calls.append({"type": "function", "function": {"name": invoke.group(1), "arguments": arguments}})


def parse_completion(text: str, thinking_mode: str = "chat") -> dict[str, Any]:
    """Split one generated assistant turn into {"role", "content", "reasoning_content", "tool_calls"}.

    `text` is what the model produced after the prompt from encode_messages(...) (decoded with
    special tokens kept), with or without the final EOS. tool_calls are OpenAI-format dicts
    without "id" (the caller assigns ids). Never raises on model text; malformed output is kept
    rather than dropped:
      - text after the first EOS is ignored (generation ends there);
      - thinking mode without </think> (e.g. cut by max_tokens): everything is reasoning;
      - a DSML block that is unterminated or malformed stays in content as plain text;
      - text after a well-formed DSML block is appended to content;
      - a string="false" value that is not JSON becomes a JSON string.
    """
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    eos = text.find(EOS)
    if eos >= 0:
        text = text[:eos]

    reasoning = ""
    if thinking_mode == "thinking":
        if text.startswith(THINK_START):  # tolerate an echoed opener
            text = text[len(THINK_START):]
        close = text.find(THINK_END)
        if close < 0:
            return {"role": "assistant", "content": "", "reasoning_content": text, "tool_calls": []}
        reasoning, text = text[:close], text[close + len(THINK_END):]

    content, tool_calls = text, []
    start = text.find(_TOOL_CALLS_OPEN)
    if start >= 0:
        parsed = _parse_tool_block(text, start)
        if parsed is not None:
            tool_calls, end = parsed
            before = text[:start]
            # The encoder writes exactly one blank line between content and the block.
            content = before[:-2] if before.endswith("\n\n") else before
            trailing = text[end:]
            if trailing.strip():
                content += trailing
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": tool_calls}


def _safe_prefix(text: str, marker: str) -> str:
    """text without a trailing piece that could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return text[:-k]
    return text


class ChatStreamSplitter:
    """Turns the growing text of a chat turn into reasoning/content deltas for streaming.

        sp = ChatStreamSplitter("thinking")
        sp.feed(text_so_far)                  # -> {"reasoning_content": ..., "content": ...} (new parts)
        sp.final(parse_completion(text, mode))  # -> the rest, when the turn ends

    Thinking mode: text before </think> is reasoning. A DSML tool-call block (and the blank line
    before it) is held back (parse_completion reports it as tool_calls when the turn ends), as is
    a trailing piece that could be the start of </think>, of the block or of an EOS spelled as
    text, and a start of the turn that could be an echoed <think> still arriving. Whatever is held back
    is reconciled with parse_completion() at the end, so the streamed pieces add up to exactly
    what the non-streaming response returns."""

    _OPEN = "\n\n" + _TOOL_CALLS_OPEN

    def __init__(self, mode: str):
        if mode not in THINKING_MODES:
            raise ValueError(f"mode must be one of {THINKING_MODES}, got {mode!r}")
        self.mode = mode
        self.sent_reasoning = ""
        self.sent_content = ""

    def _view(self, text: str) -> tuple[str, str]:
        # as parse_completion: nothing after an EOS the model spelled as text (and a trailing
        # piece that could be its start is held back)
        eos = text.find(EOS)
        text = text[:eos] if eos >= 0 else _safe_prefix(text, EOS)
        reasoning, rest = "", text
        if self.mode == "thinking":
            if THINK_START.startswith(text):  # an echoed opener may still be arriving
                return "", ""
            body = text[len(THINK_START):] if text.startswith(THINK_START) else text
            close = body.find(THINK_END)
            if close < 0:
                return _safe_prefix(body, THINK_END), ""
            reasoning, rest = body[:close], body[close + len(THINK_END):]
        cut = rest.find(_TOOL_CALLS_OPEN)
        if cut >= 0:
            content = rest[:cut]
            content = content[:-2] if content.endswith("\n\n") else content
        else:
            content = _safe_prefix(rest, self._OPEN)
        return reasoning, content

    def _delta(self, reasoning: str, content: str) -> dict:
        d = {}
        if reasoning.startswith(self.sent_reasoning) and len(reasoning) > len(self.sent_reasoning):
            d["reasoning_content"] = reasoning[len(self.sent_reasoning):]
            self.sent_reasoning = reasoning
        if content.startswith(self.sent_content) and len(content) > len(self.sent_content):
            d["content"] = content[len(self.sent_content):]
            self.sent_content = content
        return d

    def feed(self, text: str) -> dict:
        """The new reasoning/content of the turn's text so far (a dict with the keys that grew)."""
        return self._delta(*self._view(text))

    def final(self, parsed: dict) -> dict:
        """What is left to send once the turn ended, given parse_completion's result."""
        return self._delta(parsed.get("reasoning_content") or "", parsed.get("content") or "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanoseek.chat_format",
                                     description="Print the DeepSeek-V4 prompt for a conversation JSON file.")
    parser.add_argument("path", help='JSON file: a message list, or {"messages", "thinking_mode", "reasoning_effort", "tools"}')
    parser.add_argument("--thinking-mode", choices=THINKING_MODES, default=None)
    parser.add_argument("--reasoning-effort", choices=["high", "max"], default=None)
    args = parser.parse_args(argv)
    try:
        with open(args.path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, list):
            data = {"messages": data}
        prompt = encode_messages(
            data.get("messages"),
            thinking_mode=args.thinking_mode or data.get("thinking_mode") or "chat",
            reasoning_effort=args.reasoning_effort or data.get("reasoning_effort"),
            tools=data.get("tools"),
        )
    except (OSError, ValueError, TypeError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
