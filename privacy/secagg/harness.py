"""An in-process Grid for fast tests and benchmarks: the real workflow, the real mod and
real Flower ``Message``/``RecordDict`` objects, with no SuperLink, Ray or threads.

``InProcessGrid(app, node_ids)`` delivers each pushed message to ``app(message, context)``
(a ``flwr.clientapp.ClientApp`` or any callable with that signature) with a per-node
``Context`` that persists across messages, exactly as a SuperNode keeps it. Hooks:

- ``drop_at``: node id -> stage name; from that stage on (in that round and every later
  one) the node never answers.
- ``offline``: ``fn(node_id, round, stage) -> bool``; True and the node does not answer that
  message (a device that is away for a while and comes back).
- ``tamper``: ``fn(node_id, stage, reply_content) -> RecordDict | list[RecordDict] | None``
  rewrites a reply (a list sends duplicates, None suppresses it).
- ``transcript`` (with ``record_transcript``): every (direction, node id, stage, serialized
  RecordDict bytes, record names) that crossed, for leak and allow-list checks; and
  ``delivered``: every (message as sent, reply content or None) pair, for replays.
- ``current_round`` / ``current_message``: the round and the message being answered (a
  ``tamper`` function may read them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from restwise.privacy.egress import content_bytes

from . import records as R
from .fields import config


class InProcessGrid(Grid):
    def __init__(
        self,
        app: Callable[[Message, Context], Message],
        node_ids: Iterable[int],
        *,
        drop_at: dict[int, str] | None = None,
        offline: Callable[[int, int, str], bool] | None = None,
        tamper: Callable[[int, str, RecordDict], object] | None = None,
        record_transcript: bool = False,
    ):
        self.app = app
        self.node_ids = [int(n) for n in node_ids]
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in self.node_ids
        }
        self.drop_at = dict(drop_at or {})
        self.offline = offline
        self.tamper = tamper
        self.record_transcript = record_transcript
        self.transcript: list[tuple[str, int, str, bytes, tuple[str, ...]]] = []
        self.delivered: list[tuple[Message, RecordDict | None]] = []
        self.current_round = -1
        self.current_message: Message | None = None
        self._replies: dict[str, list[Message]] = {}
        self._run = None
        ensure_task_identity()

    # -- Grid API
    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used in-process
        self._run = run_id

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            node = msg.metadata.dst_node_id
            stage = _stage(msg.content)
            if self.record_transcript:
                self.transcript.append(("to-device", node, stage, content_bytes(msg.content), tuple(msg.content)))
            self.current_round = _round(msg.content)
            # the mod rewrites the content it hands to the wrapped app: keep what was sent
            sent = msg
            if self.record_transcript or self.tamper is not None:
                sent = Message(RecordDict(dict(msg.content.items())), dst_node_id=node,
                               message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)
            if node not in self.contexts or _stage_index(self.drop_at.get(node)) <= _stage_index(stage) or (
                    self.offline is not None and self.offline(node, self.current_round, stage)):
                if self.record_transcript:
                    self.delivered.append((sent, None))
                continue
            self.current_message = sent
            reply = self.app(msg, self.contexts[node])
            if self.record_transcript:
                self.delivered.append((sent, None if reply.has_error() else reply.content))
            contents: list[RecordDict | None] = [reply.content if not reply.has_error() else None]
            if self.tamper is not None and not reply.has_error():
                changed = self.tamper(node, stage, reply.content)
                contents = changed if isinstance(changed, list) else [changed]
            out = []
            for content in contents:
                if content is None:
                    if reply.has_error():
                        out.append(reply)
                    continue
                if self.record_transcript:
                    self.transcript.append(("from-device", node, stage, content_bytes(content), tuple(content)))
                out.append(Message(content, reply_to=msg))
            self._replies[msg_id] = out
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for msg_id in list(message_ids):
            out.extend(self._replies.pop(msg_id, []))
        return out

    def send_and_receive(self, messages, *, timeout=None):
        ids = list(self.push_messages(messages))
        return list(self.pull_messages(ids))


def ensure_task_identity() -> None:
    """Outside a ServerApp process nothing sets Flower's task identity, which the
    ``Message`` constructor reads; give it the in-process run's values."""
    for name, value in (("run_id", 1), ("node_id", 0), ("task_id", 0)):
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, value)


def _stage(content: RecordDict) -> str:
    record = config(content, R.SERVER_RECORD)
    return str(record.get("stage", "")) if record is not None else ""


def _round(content: RecordDict) -> int:
    record = config(content, R.SERVER_RECORD)
    value = record.get("round", -1) if record is not None else -1
    return int(value) if isinstance(value, int) else -1


# The order in which a device meets the stages; a node dropped "at" a stage stops answering
# it and every later one (join sits with collect: both open a device's part of a round).
_ORDER = {R.STAGE_SETUP: 0, R.STAGE_SHARE_KEYS: 1, R.STAGE_JOIN: 2, R.STAGE_COLLECT: 2, R.STAGE_UNMASK: 3,
          R.STAGE_FINISH: 4}


def _stage_index(stage: str | None) -> int:
    if stage is None:
        return len(_ORDER) + 1
    return _ORDER.get(stage, len(_ORDER))
