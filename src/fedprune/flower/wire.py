"""What a fedprune Flower Message carries, and how its size is measured.

The model payload is the very bytes the in-process runner exchanges (safetensors of
`client.payload.encode` down, `Method.encode` up), carried as one uint8 `Array` in an
`ArrayRecord`: Flower then chunks large payloads (5 MB chunks) and the bytes arrive unchanged,
so `bytes_up` / `bytes_down` mean the same thing in both runtimes and the decoded tensors are
identical. Scalars (round, client id, the resolved experiment) travel in a `ConfigRecord`.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

PAYLOAD = "payload"      # ArrayRecord key of the safetensors bytes
STATE = "global-state"   # RecordDict key: global trainable state (server -> client)
UPDATE = "update"        # RecordDict key: the client's encoded update (client -> server)
CONFIG = "fedprune"      # RecordDict key: ConfigRecord of scalars
STYPE = "safetensors"    # Array.stype: how the uint8 data is to be read


def pack(blob: bytes) -> ArrayRecord:
    """Safetensors bytes -> an ArrayRecord holding them unchanged."""
    return ArrayRecord({PAYLOAD: Array(dtype="uint8", shape=(len(blob),), stype=STYPE,
                                       data=blob)})


def unpack(record: ArrayRecord) -> bytes:
    """The safetensors bytes of a record made by `pack`; ValueError if it is something else."""
    array = record.get(PAYLOAD) if isinstance(record, ArrayRecord) else None
    if array is None or array.stype != STYPE:
        raise ValueError(f"expected an ArrayRecord with a {STYPE!r} array under {PAYLOAD!r}")
    return array.data


def train_content(blob: bytes, config: dict[str, int | float | str]) -> RecordDict:
    return RecordDict({STATE: pack(blob), CONFIG: ConfigRecord(config)})


def reply_content(blob: bytes) -> RecordDict:
    return RecordDict({UPDATE: pack(blob)})


def wire_size(obj) -> int:
    """Bytes Flower serializes for ``obj`` (a Message's RecordDict or any record): every
    nested object's deflated form (header, metadata, array chunks)."""
    children = obj.children or {}
    return len(obj.deflate()) + sum(wire_size(c) for c in children.values())
