#!/usr/bin/env python3
"""fuzz-seeds.py -- writes the seed corpus of tern-nbd's fuzz targets.

Usage: scripts/fuzz-seeds.py [OUT_DIR]   (default: fuzz/seeds)

Writes OUT_DIR/connection/*.bin (a byte choosing the server, then the
whole client side of an NBD connection, as fuzz_targets/connection.rs
consumes them) and OUT_DIR/request/*.bin (inputs laid out as
fuzz_targets/request.rs expects). Deterministic, so re-running it leaves
the committed seeds unchanged. Python 3 stdlib only.
"""

import os
import struct
import sys

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7

FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16

EXPORT = b"disk0"
EXPORT_SIZE = 1 << 20  # the fuzz target's image
RING_SIZE = 16 << 10  # the fuzz target's journal ring

# connection.rs: byte 0 of an input chooses the server.
SINGLE = b"\x00"  # one worker, no waiter
THREADED = b"\x01"  # one worker and a waiter


def flags(f=3):
    """Client flags: FIXED_NEWSTYLE | NO_ZEROES by default."""
    return struct.pack(">I", f)


def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def string(s):
    return struct.pack(">I", len(s)) + s


def info_data(name=EXPORT, requests=()):
    return string(name) + struct.pack(">H", len(requests)) + b"".join(struct.pack(">H", r) for r in requests)


def meta_data(name=EXPORT, queries=(b"base:allocation",)):
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def req(kind, offset=0, length=0, fl=0, cookie=None, payload=None):
    if cookie is None:
        req.cookie += 1
        cookie = req.cookie
    b = struct.pack(">IHHQQI", REQUEST_MAGIC, fl, kind, cookie, offset, length)
    if kind == CMD_WRITE:
        b += payload if payload is not None else bytes((i * 7 + 1) & 0xFF for i in range(length))
    return b


req.cookie = 0


def connection_seeds():
    s = {}
    # Simple replies, every command once, then DISC.
    s["go-all-commands"] = (
        flags()
        + opt(OPT_GO, info_data())
        + req(CMD_WRITE, 0, 512)
        + req(CMD_READ, 0, 512)
        + req(CMD_FLUSH)
        + req(CMD_TRIM, 4096, 4096)
        + req(CMD_WRITE_ZEROES, 8192, 8192)
        + req(CMD_BLOCK_STATUS, 0, 65536)  # refused: no base:allocation
        + req(CMD_WRITE, 65536, 256, FLAG_FUA)
        + req(CMD_CACHE, 0, 4096)
        + req(CMD_DISC)
    )
    # Structured replies with base:allocation.
    s["structured-block-status"] = (
        flags()
        + opt(OPT_STRUCTURED_REPLY)
        + opt(OPT_SET_META_CONTEXT, meta_data())
        + opt(OPT_GO, info_data(requests=(1, 2, 3)))
        + req(CMD_WRITE, 4096, 512)
        + req(CMD_WRITE_ZEROES, 16384, 4096, FLAG_NO_HOLE | FLAG_FAST_ZERO)
        + req(CMD_BLOCK_STATUS, 0, EXPORT_SIZE)
        + req(CMD_BLOCK_STATUS, 0, 65536, FLAG_REQ_ONE)
        + req(CMD_READ, 4096, 1024, FLAG_DF)
        + req(CMD_READ, EXPORT_SIZE - 10, 11)  # past the end: error chunk
        + req(CMD_DISC)
    )
    # EXPORT_NAME without NO_ZEROES (the reply carries 124 zero bytes).
    s["export-name"] = (
        flags(1)
        + opt(OPT_EXPORT_NAME, EXPORT)
        + req(CMD_WRITE, 512, 512)
        + req(CMD_READ, 0, 2048)
        + req(CMD_FLUSH, fl=FLAG_FUA)
        + req(CMD_DISC)
    )
    # Option haggling: LIST, INFO, LIST_META_CONTEXT, an unknown option,
    # an unknown export, then the default export (empty name).
    s["haggle-default-export"] = (
        flags()
        + opt(OPT_LIST)
        + opt(OPT_INFO, info_data(requests=(1, 2)))
        + opt(OPT_STRUCTURED_REPLY)
        + opt(OPT_LIST_META_CONTEXT, meta_data(queries=(b"base:",)))
        + opt(OPT_LIST_META_CONTEXT, meta_data(queries=()))
        + opt(200, b"\x01\x02\x03")
        + opt(OPT_GO, info_data(b"nope"))
        + opt(OPT_GO, info_data(b""))
        + req(CMD_TRIM, 0, EXPORT_SIZE)
        + req(CMD_WRITE_ZEROES, 0, 4096)
        + req(99, 0, 0)  # unknown command
        + req(CMD_READ, 0, 4096, FLAG_REQ_ONE)  # bad flag
        + req(CMD_DISC)
    )
    # The client aborts.
    s["abort"] = flags() + opt(OPT_LIST) + opt(OPT_ABORT)
    # More WRITE data than the journal ring holds: the ring overflows into
    # the dirty bitmap mid-connection (the target's resync brings it back).
    # Cookies of its own, so the request seeds after it stay as they were.
    writes = RING_SIZE // 4096 + 1
    s["overflow"] = (
        flags()
        + opt(OPT_GO, info_data())
        + b"".join(req(CMD_WRITE, i * 4096, 4096, cookie=0x100 + i) for i in range(writes))
        + req(CMD_WRITE_ZEROES, 0, 8192, FLAG_FUA, cookie=0x100 + writes)
        + req(CMD_FLUSH, cookie=0x101 + writes)
        + req(CMD_DISC, cookie=0x102 + writes)
    )
    # Every seed for both servers: the threaded one hands FLUSH, FUA and
    # uncached READs to its waiter.
    servers = (("single", SINGLE), ("threaded", THREADED))
    return {f"{name}-{server}": mode + seed for name, seed in s.items() for server, mode in servers}


def request_seed(r, export_size=EXPORT_SIZE, structured=True, base_allocation=1, option=b""):
    sflags = (1 if structured else 0) | (2 if base_allocation is not None else 0)
    return r[:28] + struct.pack(">QBI", export_size, sflags, base_allocation or 0) + option


def request_seeds():
    return {
        "write-go": request_seed(req(CMD_WRITE, 0, 512, FLAG_FUA, payload=b""), option=info_data(requests=(3,))),
        "read-df-meta": request_seed(req(CMD_READ, 4096, 4096, FLAG_DF), option=meta_data()),
        "block-status-simple": request_seed(
            req(CMD_BLOCK_STATUS, 0, 65536, FLAG_REQ_ONE), structured=False, base_allocation=None,
            option=meta_data(b"", (b"base:", b"base:allocation")),
        ),
        "zeroes-past-end": request_seed(
            req(CMD_WRITE_ZEROES, EXPORT_SIZE - 10, 11, FLAG_NO_HOLE | FLAG_FAST_ZERO), option=info_data(b""),
        ),
        "trim-overflow": request_seed(req(CMD_TRIM, 2**64 - 2, 4096), export_size=2**64 - 1),
    }


def write(out, target, seeds):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name + ".bin"), "wb") as f:
            f.write(data)
    print(f"{d}: {len(seeds)} seeds")


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "fuzz", "seeds")
    write(out, "connection", connection_seeds())
    write(out, "request", request_seeds())


if __name__ == "__main__":
    main()
