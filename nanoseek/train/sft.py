"""Supervised fine-tuning (SFT) data: chat conversations -> token ids + loss mask.

A conversation is rendered with the DeepSeek-V4 chat encoding (nanoseek.chat_format), the very
encoding the server and `nanoseek chat` prompt the model with, so fine-tuning and serving see
the same tokens. The loss mask selects what the model must learn to write: the assistant turns
(reasoning and `</think>` where the encoding keeps them, the answer, DSML tool calls and the
end-of-sentence token). Everything the model only reads (BOS, system prompt, user turns, tool
results, the tools block, the `<｜Assistant｜><think>` generation prompt) is masked out.
Message text is always tokenized as text, so a conversation that quotes a special-token string
cannot forge a control token.

    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.train.sft import render

    tok = load_tokenizer("runs/tokenizer")
    ids, loss_mask = render([{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4", "reasoning_content": "add"}],
                            tok, thinking_mode="thinking")
    # tok.decode(ids) == chat_format.encode_messages(messages, "thinking")
    # loss_mask[i] is True where ids[i] is a target (predicted from position i-1):
    # here the tokens of "add", "</think>", "4" and "<｜end▁of▁sentence｜>".

See docs/chat_format.md ("Token ids and the loss mask") for the exact rules.
"""

from __future__ import annotations

from typing import Any

from .. import chat_format


def render(messages: list[dict[str, Any]], tokenizer: Any, thinking_mode: str = "chat",
           tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of one conversation and its loss mask (two lists of the same length).

    messages: OpenAI-style messages as chat_format.encode_messages takes them (assistant turns
        may carry "reasoning_content" and "tool_calls"; tool results are "tool" messages).
    tokenizer: a nanoseek Tokenizer (or any object with `special_tokens` and an `encode(text)`
        that treats special-token strings as text).
    thinking_mode: "chat" or "thinking", as in chat_format.
    tools: request-level OpenAI tools, rendered into the (masked) tools block.

    loss_mask[i] True means token i is a training target, i.e. the logits at position i-1 are
    trained to predict ids[i]. Raises TypeError/ValueError on malformed messages.
    """
    return chat_format.encode_ids(messages, tokenizer, thinking_mode=thinking_mode, tools=tools)
