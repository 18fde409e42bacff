"""The token feed: a simulated LLM, the chats it answers, and the never-ending ``ticker``."""

from __future__ import annotations
