"""What the model sees: the transcript as chat messages, fitted to a token budget.

Every request to the model fits its input budget. When the conversation does not
fit, old tool outputs are elided first (a short head stays, with a note that the
full output is in the notebook), then the oldest turns are left out; the model is
told what is missing. The kernel is never touched: its variables are the real memory.

The work is bounded by the budget, not by the length of the history: each event's
token cost is counted once and stored, and older turns are read newest first only
until the budget is spent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .store import Event

Message = dict[str, Any]
Counter = Callable[[list[Message]], int]
"""Counts the tokens of a list of messages (litellm's counter for the turn's model)."""

_KEEP_CHARS = 300
"""Characters of an elided tool output that stay visible."""
_NOTE_RESERVE = 120
"""Tokens kept free for the note telling the model what was left out."""

NOT_EXECUTED = "[not executed: the turn was interrupted before this call ran]"


class ContextTooSmall(Exception):
    """The current turn alone does not fit the budget."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(f"the current turn needs {needed:,} tokens; the budget is {budget:,}")
        self.needed = needed
        self.budget = budget


def elide(text: str) -> str | None:
    """A tool output shortened to its head and a note; None when it is short already."""
    if len(text) <= _KEEP_CHARS + 200:
        return None
    return (
        f"{text[:_KEEP_CHARS]}\n[... {len(text) - _KEEP_CHARS:,} more characters elided to fit "
        "the context; the full output is in the session's notebook. The kernel still holds "
        "the variables: inspect them rather than re-running the code.]"
    )


def unknown_result(live_output: str) -> str:
    """What the model is told of a call that ran while the service stopped."""
    seen = (
        f" Output received before that:\n{live_output}"
        if live_output
        else " No output had arrived."
    )
    return (
        "[ran, result unknown: the service stopped while this call was running, so its "
        f"result was not recorded; the kernel may hold its effects.{seen}]"
    )


def direct_note(data: dict[str, Any], text: str | None = None) -> str:
    """How the model learns of code the user ran in the kernel themselves."""
    code = str(data.get("arguments", {}).get("code", ""))
    output = data.get("text", "") if text is None else text
    return (
        "[I ran this code in the kernel myself; its state is now part of the session]\n"
        f"```python\n{code}\n```\nOutput:\n```\n{output}\n```"
    )


def service_note(text: str) -> str:
    return f"[Note from the service: {text}]"


def assistant_message(text: str, calls: list[dict[str, str]]) -> Message:
    """An OpenAI assistant message from stored tool calls ({id, name, arguments})."""
    message: Message = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for c in calls
        ]
    return message


@dataclass
class Item:
    """One model message, with its elided form when it has one, and their token costs."""

    message: Message
    tokens: int
    short: Message | None = None
    tokens_short: int = 0
    event_id: int | None = None

    def __post_init__(self) -> None:
        if self.short is None:
            self.tokens_short = self.tokens


@dataclass
class TurnItems:
    """The messages of one stored turn."""

    turn: int
    items: list[Item] = field(default_factory=list)

    @property
    def tokens_short(self) -> int:
        return sum(i.tokens_short for i in self.items)


@dataclass
class History:
    """Older turns, newest first, as far as they could fit; `complete` if none are missing."""

    turns: list[TurnItems]
    complete: bool
    counted: list[tuple[int, int, int]] = field(default_factory=list)
    """(event id, tokens, tokens_short) counted while reading, for the store to keep."""


@dataclass
class Window:
    """The messages of one model request, and the note on what is missing."""

    messages: list[Message]
    note: str | None
    tokens: int


def make_item(message: Message, short: Message | None, count: Counter) -> Item:
    tokens = count([message])
    return Item(message, tokens, short, count([short]) if short is not None else tokens)


def tool_item(call_id: str, text: str, count: Counter) -> Item:
    message: Message = {"role": "tool", "tool_call_id": call_id, "content": text}
    shortened = elide(text)
    short = {**message, "content": shortened} if shortened is not None else None
    return make_item(message, short, count)


def _event_messages(event: Event) -> tuple[Message | None, Message | None]:
    """The message an event contributes (and its elided form), if any."""
    data = event.data
    if event.type == "user":
        return {"role": "user", "content": data["content"]}, None
    if event.type == "note" and data.get("for_model"):
        return {"role": "user", "content": service_note(str(data["for_model"]))}, None
    if event.type == "assistant":
        return assistant_message(data.get("content") or "", data.get("tool_calls") or []), None
    if event.type == "tool_result" and data.get("direct"):
        text = str(data.get("text", ""))
        full = {"role": "user", "content": direct_note(data)}
        shortened = elide(text)
        short = {"role": "user", "content": direct_note(data, shortened)} if shortened else None
        return full, short
    if event.type == "tool_result":
        text = str(data.get("text", ""))
        full = {"role": "tool", "tool_call_id": data["call_id"], "content": text}
        shortened = elide(text)
        return full, ({**full, "content": shortened} if shortened else None)
    return None, None


def turn_items(
    turn: int, events: Iterable[Event], count: Counter, counted: list[tuple[int, int, int]]
) -> TurnItems:
    """One stored turn as messages, every tool call answered, costs counted once."""
    result = TurnItems(turn)
    pending: dict[str, str | None] = {}  # call id -> live output if it started, else None
    started: dict[str, str] = {}
    deferred: list[Item] = []  # notes that arrived while calls were open

    def close_pending() -> None:
        for call_id in list(pending):
            text = unknown_result(started[call_id]) if call_id in started else NOT_EXECUTED
            result.items.append(tool_item(call_id, text, count))
            del pending[call_id]
        result.items.extend(deferred)
        deferred.clear()

    for event in events:
        data = event.data
        if event.type == "tool_started":
            started[str(data.get("call_id"))] = str(data.get("live_output", ""))
            continue
        full, short = _event_messages(event)
        if full is None:
            continue
        if event.tokens is None or event.tokens_short is None:
            item = make_item(full, short, count)
            counted.append((event.id, item.tokens, item.tokens_short))
        else:
            item = Item(full, event.tokens, short, event.tokens_short)
        item.event_id = event.id
        if event.type == "tool_result" and not data.get("direct"):
            if data["call_id"] not in pending:
                continue  # an answer to no open call: the model could not place it
            del pending[data["call_id"]]
            result.items.append(item)
            if not pending:
                close_pending()
        elif event.type == "note" and pending:
            deferred.append(item)
        else:
            close_pending()
            result.items.append(item)
            if event.type == "assistant":
                pending.update({c["id"]: None for c in data.get("tool_calls") or []})
    close_pending()
    return result


def read_history(newest_first: Iterable[Event], count: Counter, budget: int) -> History:
    """Older turns, newest first, until their elided cost exceeds `budget`."""
    turns: list[TurnItems] = []
    counted: list[tuple[int, int, int]] = []
    spent = 0
    group: list[Event] = []
    for event in newest_first:
        if group and event.turn != group[0].turn:
            items = turn_items(group[0].turn, reversed(group), count, counted)
            spent += items.tokens_short
            if spent > budget:
                return History(turns, complete=False, counted=counted)
            turns.append(items)
            group = []
        group.append(event)
    if group:
        items = turn_items(group[0].turn, reversed(group), count, counted)
        if spent + items.tokens_short > budget:
            return History(turns, complete=False, counted=counted)
        turns.append(items)
    return History(turns, complete=True, counted=counted)


def fit(history: History, current: list[Item], fixed: int, budget: int) -> Window:
    """The request's messages within `budget` tokens, of which `fixed` are taken already.

    Raises:
        ContextTooSmall: the current turn does not fit even with its outputs elided.
    """
    available = budget - fixed - _NOTE_RESERVE
    spent = sum(i.tokens_short for i in current)
    if spent > available:
        raise ContextTooSmall(fixed + spent + _NOTE_RESERVE, budget)
    kept: list[TurnItems] = []
    for turn in history.turns:
        if spent + turn.tokens_short > available:
            break
        kept.append(turn)
        spent += turn.tokens_short
    dropped = len(kept) < len(history.turns) or not history.complete
    # Give the room left to full outputs, newest first: the current turn, then older ones.
    full: set[int] = set()
    order = [*reversed(current), *(i for t in kept for i in reversed(t.items))]
    for item in order:
        extra = item.tokens - item.tokens_short
        if extra <= available - spent:
            full.add(id(item))
            spent += extra
    elided = sum(1 for i in order if i.short is not None and id(i) not in full)
    messages = [
        i.message if id(i) in full or i.short is None else i.short
        for i in [*(i for t in reversed(kept) for i in t.items), *current]
    ]
    note = _note(elided, dropped)
    return Window(messages, note, fixed + spent)


def _note(elided: int, dropped: bool) -> str | None:
    parts = []
    if dropped:
        parts.append("the oldest part of the conversation is left out")
    if elided:
        parts.append(f"the outputs of {elided} earlier tool call(s) are shortened")
    if not parts:
        return None
    return (
        "To fit your input limit, " + " and ".join(parts) + ". Nothing was lost in the kernel: "
        "its variables, imports and files from those turns still exist (list_variables shows "
        "them), and the full record is in the session's notebook."
    )


def message_size(message: Message) -> int:
    """Characters of a message as sent (a quick stand-in to decide on counting in a thread)."""
    return len(json.dumps(message, ensure_ascii=False))
