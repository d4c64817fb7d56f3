"""A conversation as inference sees it, one assistant turn at a time: what fine-tuning trains.

For each assistant message, the prompt is exactly what chat inference renders for the messages
before it (`Tokenizer.apply_chat_template` with the generation prompt, as `chat_prompt` builds it),
and the reply is exactly what the model should generate after that prompt, end-of-sentence token
included. The reply follows from the template: its rendering of the message, after the part the
generation prompt already wrote. Where the generation prompt opened R1's reasoning block
(`<｜Assistant｜><think>\\n`) but the template renders the message without one (R1's own template
drops reasoning), the reply closes the block first, with the reasoning in it when it is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ktjax.text.reasoning import THINK_OPEN, reasoning_block, split_reasoning

if TYPE_CHECKING:
    from ktjax.text.tokenizer import Tokenizer

__all__ = ["AssistantTurn", "assistant_turns", "reply_after"]


@dataclasses.dataclass(frozen=True)
class AssistantTurn:
    prompt: str  # what inference renders before the reply, generation prompt included
    reply: str  # what the model should generate after `prompt`


def assistant_turns(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *, keep_reasoning: bool = False,
                    thinking: bool | None = None) -> list[AssistantTurn]:
    """The turns of every assistant message that follows another message (a conversation that opens
    with the assistant has no prompt for that first message: it is only context for later turns).

    keep_reasoning: the reply carries the message's reasoning (split_reasoning's), else only its answer.
    thinking: as for `apply_chat_template` and `chat_prompt`: pass what inference will pass.
    Raises ValueError naming the message when the template's text cannot be split this way.
    """
    turns = []
    for k, message in enumerate(messages):
        if message.get("role") != "assistant" or k == 0:
            continue
        try:
            turns.append(_assistant_turn(tokenizer, messages[:k], message, keep_reasoning, thinking))
        except ValueError as e:
            raise ValueError(f"message {k}: {e}") from None
    return turns


def _assistant_turn(tokenizer: Tokenizer, history: Sequence[Mapping[str, Any]], message: Mapping[str, Any],
                    keep_reasoning: bool, thinking: bool | None) -> AssistantTurn:
    def render(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                             thinking=thinking)

    prompt = render(history, True)
    before = render(history, False)
    reasoning, answer_only = split_reasoning(message)
    turn = _added_text(before, render([*history, answer_only], False))
    reasoning_to_write = None
    if keep_reasoning and reasoning is not None:
        with_reasoning = _added_text(before, render([*history, {**answer_only, "reasoning_content": reasoning}], False))
        # A template that renders reasoning itself decides how the reply shows it; R1's and V3's ignore it,
        # so the reply gets R1's block.
        if with_reasoning == turn:
            reasoning_to_write = reasoning
        else:
            turn = with_reasoning
    return AssistantTurn(prompt, reply_after(_added_text(before, prompt), turn, reasoning_to_write))


def _added_text(before: str, after: str) -> str:
    """What rendering one more message (or the generation prompt) appended to `before`."""
    if not after.startswith(before):
        raise ValueError("the chat template does not render it as an extension of the messages before it, "
                         "so the prompt inference builds cannot be told apart from the reply")
    return after[len(before):]


def reply_after(generation_prompt: str, turn: str, reasoning: str | None = None) -> str:
    """The reply that follows `generation_prompt` for a message the template renders as `turn`.

    reasoning: written as R1's block before the answer (None: nothing to add). The split is at the
    end of the generation prompt exactly, so no character of the answer lands in the prompt.
    """
    if turn.startswith(generation_prompt):
        answer = turn[len(generation_prompt):]
        return answer if reasoning is None else reasoning_block(reasoning) + answer
    header = generation_prompt.removesuffix(THINK_OPEN)
    if header != generation_prompt and turn.startswith(header):
        # The prompt opened R1's reasoning block, the template's turn has none: close it (empty when
        # the reasoning is not kept, as R1 itself writes a reply it did not reason about).
        return reasoning_block(reasoning or "").removeprefix(THINK_OPEN) + turn[len(header):]
    raise ValueError(f"the chat template renders the assistant message as {turn[:40]!r}..., which does not start "
                     f"with its generation prompt {generation_prompt!r}")
