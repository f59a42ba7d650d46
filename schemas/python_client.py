"""A non-Rust client of the message schema (Python + msgpack + jsonschema).

check GOLDEN_DIR SCHEMA: decodes every golden vector, validates it against
messages.schema.json and prints one JSON line per vector.
encode: prints the MessagePack of a DocumentSubmitted built here, hex-encoded,
for the Rust side to decode.
"""
import json
import sys
from pathlib import Path

import msgpack

KINDS = {
    "document_submitted": "DocumentSubmitted",
    "page_rendered": "PageRendered",
    "page_inferred": "PageInferred",
    "event_split": "Event",
    "document_failed": "DocumentFailed",
    "document_cancelled": "DocumentCancelled",
}


def check(golden_dir: Path, schema_path: Path) -> None:
    import jsonschema

    schema = json.loads(schema_path.read_text())
    for path in sorted(golden_dir.glob("*.msgpack")):
        msg = msgpack.unpackb(path.read_bytes(), raw=False)
        assert isinstance(msg, dict), f"{path.name}: not a map"
        kind = KINDS[path.stem]
        sub = {"$ref": f"#/$defs/{kind}", "$defs": schema["$defs"]}
        jsonschema.validate(msg, sub)
        print(json.dumps({"file": path.name, "kind": kind, "doc_id": msg["doc_id"], "v": msg["v"]}))


def encode() -> None:
    msg = {
        "v": 1,
        "doc_id": "py-client-1",
        "title": "From Python",
        "source": {"inline": b"%PDF-1.4 tiny", "filename": "tiny.pdf"},
        "options": {"dpi": 100.0},
        "submitted_at": "2026-11-28T12:00:00Z",
        "a_field_from_the_future": [1, 2, 3],
    }
    sys.stdout.write(msgpack.packb(msg, use_bin_type=True).hex())


if __name__ == "__main__":
    if sys.argv[1] == "check":
        check(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        encode()
