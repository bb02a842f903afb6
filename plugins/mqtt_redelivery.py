"""Which committed MQTT messages the broker may send again: the ``mqtt`` source's record.

The source commits a batch of messages, then acknowledges them. If it dies
before the broker has *received* those acknowledgements — not merely before
they were written: they may sit in a socket buffer, a proxy or a stalled link
— the broker sends the messages again (DUP flag, same packet id) when the
source reconnects. To queue each message once, every commit saves, in the same
transaction, the packet ids of its QoS 1 messages with a digest of their topic
and payload, as one checkpoint row per commit (``u<number>`` =
``<packet id>:<digest> ...``). A re-sent message whose packet id and digest
match a live entry was committed already.

An entry is dropped only once the broker is known to have the
acknowledgement:

- **its packet id was used again** for another message: a broker reuses a
  packet id only after the acknowledgement of the message that had it;
- **flow control** (MQTT 5): the broker may have at most ``receive_maximum``
  unacknowledged messages out to the source, and acknowledgements arrive in
  order, so once the n-th message of a connection has arrived, the broker had
  the acknowledgements of the first n - receive_maximum;
- **after a reconnect**, at the first message that is not a re-send: a broker
  re-sends every unacknowledged message of the session before new ones, so the
  entries from before the connection that did not come back are done (those
  that did come back are kept, as entries of this connection: their new
  acknowledgements may be lost as well).

A row is deleted once none of its entries is live. The one case a digest
cannot tell apart: the broker reuses the packet id of a live entry for a
message with the same topic and payload, and the agent dies after the broker
sent it and before committing it; the re-send then looks like the first one.
"""

from __future__ import annotations

import hashlib

#: Checkpoint keys of the rows: ``u`` and the commit's number.
ROW_PREFIX = "u"


def digest(topic: bytes, payload: bytes) -> str:
    """What a re-sent message must match: a digest of its topic and payload."""
    return hashlib.blake2b(topic + b"\0" + payload, digest_size=8).hexdigest()


class RedeliveryLog:
    """The live entries (packet id → digest), kept as one checkpoint row per commit."""

    def __init__(self) -> None:
        #: packet id -> (digest, row)
        self.entries: dict[int, tuple[str, int]] = {}
        self._row_mids: dict[int, list[int]] = {}
        self._row_live: dict[int, int] = {}
        #: Rows of this connection -> number of the last message they hold.
        self._row_last: dict[int, int] = {}
        self._next_row = 1
        self._first_row = 1  # rows below it are from before this connection
        self._old_pending = False
        self._received = 0
        self._receive_maximum: int | None = None
        self._legacy: list[str] = []
        # This commit's changes, saved by checkpoint() and applied by committed().
        self._row_items: list[str] = []
        self._dropped: set[int] = set()

    def load(self, checkpoints: dict[str, str]) -> None:
        """The entries saved by earlier runs (and the one-key-per-id form of version 0.1)."""
        rows = []
        legacy = []
        for key, value in checkpoints.items():
            if key.startswith(ROW_PREFIX) and key[1:].isdigit():
                rows.append((int(key[1:]), value))
            elif key.startswith("m") and key[1:].isdigit():
                self._legacy.append(key)
                legacy.append((int(key[1:]), value.partition(" ")[0]))
        for row, value in sorted(rows):
            self._row_mids.setdefault(row, [])
            self._row_live.setdefault(row, 0)
            for item in value.split():
                mid_text, _, entry_digest = item.partition(":")
                if mid_text.isdigit():
                    self._put(int(mid_text), entry_digest, row)
            self._next_row = max(self._next_row, row + 1)
        for row in [r for r, live in self._row_live.items() if not live]:
            self._dropped.add(row)
            self._forget_row(row)
        for mid, entry_digest in legacy:  # saved again as a row by the first commit
            self.keep(mid, entry_digest)

    @property
    def has_entries(self) -> bool:
        return bool(self.entries)

    def new_connection(self, receive_maximum: int | None) -> None:
        """A connection starts: what came before it waits for its re-sends."""
        self._first_row = self._next_row
        self._old_pending = bool(self._row_mids)
        self._received = 0
        self._row_last.clear()
        self._receive_maximum = receive_maximum

    def seen(self, mid: int, message_digest: str, dup: bool) -> bool:
        """A QoS 1 message arrived (in order): True if it was committed already."""
        self._received += 1
        if dup:
            entry = self.entries.get(mid)
            if entry is not None and entry[0] == message_digest:
                self.keep(mid, message_digest)  # acknowledged again, on this connection
                return True
        elif self._old_pending:
            self._old_pending = False
            for row in [r for r in self._row_mids if r < self._first_row]:
                self._dropped.add(row)
                self._forget_row(row)
        return False

    def keep(self, mid: int, message_digest: str) -> None:
        """The message is committed in this commit: an entry of this commit's row."""
        self._put(mid, message_digest, self._next_row)
        self._row_items.append(f"{mid}:{message_digest}")

    def release(self, mid: int) -> None:
        """A message not queued (skipped) took this packet id: an older entry is done."""
        self._drop_entry(mid)

    def checkpoint(self) -> dict[str, str | None]:
        """The checkpoint rows this commit writes and deletes."""
        maximum = self._receive_maximum
        if maximum:
            limit = self._received - maximum
            for row, last in list(self._row_last.items()):
                if last <= limit and row != self._next_row:
                    self._dropped.add(row)
                    self._forget_row(row)
        changes: dict[str, str | None] = {key: None for key in self._legacy}
        for row in self._dropped:
            changes[f"{ROW_PREFIX}{row}"] = None
        if self._row_items:
            changes[f"{ROW_PREFIX}{self._next_row}"] = " ".join(self._row_items)
        return changes

    def committed(self) -> None:
        """The commit holding :meth:`checkpoint` succeeded."""
        if self._row_items:
            self._row_last[self._next_row] = self._received
            self._next_row += 1
        self._row_items = []
        self._dropped = set()
        self._legacy = []

    # -- bookkeeping ------------------------------------------------------------

    def _put(self, mid: int, entry_digest: str, row: int) -> None:
        self._drop_entry(mid)
        self.entries[mid] = (entry_digest, row)
        self._row_mids.setdefault(row, []).append(mid)
        self._row_live[row] = self._row_live.get(row, 0) + 1

    def _drop_entry(self, mid: int) -> None:
        old = self.entries.pop(mid, None)
        if old is None:
            return
        row = old[1]
        live = self._row_live.get(row, 1) - 1
        self._row_live[row] = live
        if live <= 0 and row != self._next_row:
            self._dropped.add(row)
            self._forget_row(row)

    def _forget_row(self, row: int) -> None:
        for mid in self._row_mids.pop(row, []):
            entry = self.entries.get(mid)
            if entry is not None and entry[1] == row:
                del self.entries[mid]
        self._row_live.pop(row, None)
        self._row_last.pop(row, None)
