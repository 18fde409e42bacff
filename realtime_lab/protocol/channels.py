"""Channel names that mean something to both ends of the wire.

A chat streams on its own channel, ``chat.<id>``: the server names it so, and a client that
wants to cancel a chat finds the chat's id in the channel it reads.
"""

from __future__ import annotations

from typing import Final

#: The prefix of a chat's channel name; the chat's id follows it.
CHAT_PREFIX: Final = "chat."


def chat_channel(chat_id: str) -> str:
    """The channel that chat ``chat_id`` streams on; subscribe to it to read the chat."""
    return CHAT_PREFIX + chat_id


def chat_id_of(channel: str) -> str | None:
    """The chat id in ``channel``, or ``None`` when it is not a chat's channel.

    Use the id for the chat's HTTP resource (``/api/chats/<id>``), e.g. to cancel it.
    """
    if channel.startswith(CHAT_PREFIX) and len(channel) > len(CHAT_PREFIX):
        return channel[len(CHAT_PREFIX) :]
    return None


__all__ = ["CHAT_PREFIX", "chat_channel", "chat_id_of"]
