"""An archive reader that is not bk's: mongodump's archive format (mongo-tools
common/archive/spec.md) walked with pymongo's own BSON decoder and a CRC-64/XZ of its own.

    archive_reader.py FILE   prints one JSON object: the header, the prelude (metadata parsed),
                             and per namespace its document count and the sha256 of its
                             documents' raw bytes in archive order.

Written from the spec for the design note of issue 14 (/work/notes/mongo-probes), independently
of bk's Rust reader. Any structural fault, bad length, CRC mismatch or missing EOF raises."""
import hashlib, json, struct, sys

import bson


def crc64(data, crc=0, _t=[]):
    """CRC-64/XZ (Go's crc64.New(crc64.MakeTable(crc64.ECMA))), continuable: crc64(b, crc64(a)) == crc64(a + b)."""
    if not _t:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0xC96C5795D7870F42 if c & 1 else c >> 1
            _t.append(c)
    crc ^= (1 << 64) - 1
    for b in data:
        crc = _t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ ((1 << 64) - 1)


def read_archive(buf):
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(buf):
            raise ValueError(f"truncated at {pos}")
        b = buf[pos:pos + n]
        pos += n
        return b

    def doc_or_term():
        if pos + 4 > len(buf):
            raise ValueError(f"truncated at {pos}")
        size = struct.unpack("<i", buf[pos:pos + 4])[0]
        if size == -1:
            take(4)
            return None
        if size < 5 or size > 16 * 1024 * 1024:
            raise ValueError(f"bad size {size} at {pos}")
        d = take(size)
        if d[-1] != 0:
            raise ValueError("doc not NUL-terminated")
        return d

    if struct.unpack("<I", take(4))[0] != 0x8199e26d:
        raise ValueError("bad magic")
    header = bson.decode(doc_or_term())
    prelude = []
    while (d := doc_or_term()) is not None:
        prelude.append(bson.decode(d))
    state = {f'{m["db"]}.{m["collection"]}': {"closed": False, "count": 0, "crc": 0, "sha": hashlib.sha256()}
             for m in prelude}
    while pos < len(buf):
        h = bson.decode(doc_or_term())
        ns = f'{h["db"]}.{h["collection"]}'
        st = state[ns]
        if st["closed"]:
            raise ValueError(f"{ns} after its EOF")
        while (d := doc_or_term()) is not None:
            if h["EOF"]:
                raise ValueError("documents after an EOF header")
            bson.decode(d)
            st["count"] += 1
            st["crc"] = crc64(d, st["crc"])
            st["sha"].update(d)
        if h["EOF"]:
            signed = st["crc"] - (1 << 64) if st["crc"] >= 1 << 63 else st["crc"]
            if signed != h["CRC"]:
                raise ValueError(f"CRC mismatch {ns}")
            st["closed"] = True
    unclosed = [ns for ns, st in state.items() if not st["closed"]]
    if unclosed:
        raise ValueError(f"no EOF for {unclosed}")
    return header, prelude, state


header, prelude, state = read_archive(open(sys.argv[1], "rb").read())
print(json.dumps({
    "header": header,
    "prelude": [{k: v for k, v in m.items() if k != "metadata"} | {"metadata": json.loads(m["metadata"])} for m in prelude],
    "namespaces": {ns: {"count": st["count"], "sha256": st["sha"].hexdigest()} for ns, st in state.items()},
}))
