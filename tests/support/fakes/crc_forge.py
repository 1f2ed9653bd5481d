"""Forge a JSON body with a chosen CRC32: PayPal signs only crc32(body), so a leaked genuine
transmission verifies for any body with the same CRC. Tests use this to prove that
Payguard does not accept such a replay."""

from __future__ import annotations

import json
import zlib


def forge_same_crc(genuine: bytes, forged_event: dict, filler_field: str = "summary") -> bytes:
    """`forged_event` serialized with 64 adjustable letters in `filler_field` flipped so that
    its CRC32 equals that of `genuine` (linear algebra over GF(2))."""
    event = json.loads(json.dumps(forged_event))
    event[filler_field] = "m" * 64
    body = bytearray(json.dumps(event).encode())
    start = body.index(b"m" * 64)
    n = len(body)
    zero = zlib.crc32(bytes(n))

    def effect(position: int, bit: int) -> int:
        delta = bytearray(n)
        delta[position] = bit
        return zlib.crc32(bytes(delta)) ^ zero

    basis: dict[int, tuple[int, list[tuple[int, int]]]] = {}
    for i in range(64):
        for bit in (1, 2):  # 'm' ^ 1 = 'l', 'm' ^ 2 = 'o': still letters, still valid JSON
            value, flips = effect(start + i, bit), [(start + i, bit)]
            for b in range(31, -1, -1):
                if not (value >> b) & 1:
                    continue
                if b in basis:
                    value ^= basis[b][0]
                    flips = flips + basis[b][1]
                else:
                    basis[b] = (value, flips)
                    break
    target = zlib.crc32(genuine) ^ zlib.crc32(bytes(body))
    for b in range(31, -1, -1):
        if (target >> b) & 1:
            target ^= basis[b][0]
            for position, bit in basis[b][1]:
                body[position] ^= bit
    assert target == 0 and zlib.crc32(bytes(body)) == zlib.crc32(genuine)
    return bytes(body)
