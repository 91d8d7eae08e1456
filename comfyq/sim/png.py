"""Pure-python image helpers for the ComfyUI simulator: PNG writing, header sniffing, solid WebP."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# tEXt key marking PNGs the simulator wrote: they are one solid colour, so a WebP preview is cheap.
SOLID_KEY = "comfyq_sim_color"
_GRAY = (127, 127, 127)


class UnidentifiedImageError(Exception):
    """Raised when bytes are not an image the simulator can read (mirrors PIL's error)."""


@dataclass(frozen=True)
class ImageInfo:
    """What the simulator knows about an image file: size, a representative colour, solidness."""

    width: int
    height: int
    rgb: tuple[int, int, int]
    has_alpha: bool = False
    solid: bool = False


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# Raw image data up to this size is stored in the zlib stream uncompressed: no deflate state to
# set up (deflateInit allocates and clears ~256 KiB of tables, most of the cost of a 16x16 PNG),
# one adler32. The file stays a valid PNG with the same pixels; it is a few hundred bytes bigger.
_STORED_MAX = 2048


def _stored_zlib(raw: bytes) -> bytes:
    """A zlib stream of ``raw`` in stored (uncompressed) deflate blocks, raw <= 65535 bytes."""
    n = len(raw)
    # 0x78 0x01: deflate, 32 KiB window, no dictionary, "fastest" (FCHECK makes it % 31 == 0).
    head = b"\x78\x01\x01" + struct.pack("<HH", n, n ^ 0xFFFF)  # BFINAL=1, BTYPE=00
    return head + raw + struct.pack(">I", zlib.adler32(raw))


def encode_png(
    width: int,
    height: int,
    rgb: tuple[int, int, int],
    texts: dict[str, str] | None = None,
    level: int = 1,
) -> bytes:
    """Encode a solid-colour 8-bit RGB PNG; `texts` become tEXt chunks."""
    row = b"\x00" + bytes(rgb) * width
    if len(row) * height <= _STORED_MAX:
        idat = _stored_zlib(row * height)
    else:
        # Feed several rows at once so huge images never need the whole raw buffer in memory.
        rows_per_block = max(1, min(height, (1 << 22) // len(row)))
        block = row * rows_per_block
        parts: list[bytes] = []
        if rows_per_block >= height:  # one block: zlib.compress, half the cost, the same bytes
            parts.append(zlib.compress(block, level))
        else:
            comp = zlib.compressobj(level)
            left = height
            while left > 0:
                n = min(left, rows_per_block)
                parts.append(comp.compress(block if n == rows_per_block else row * n))
                left -= n
            parts.append(comp.flush())
        idat = b"".join(parts)
    out = [PNG_MAGIC, _ihdr(width, height)]
    all_texts = {SOLID_KEY: ",".join(str(int(v)) for v in rgb)}
    all_texts.update(texts or {})
    for key, value in all_texts.items():
        out.append(
            _chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace"))
        )
    out.append(_chunk(b"IDAT", idat))
    out.append(_IEND)
    return b"".join(out)


_IEND = _chunk(b"IEND", b"")
_IHDRS: dict[tuple[int, int], bytes] = {}


def _ihdr(width: int, height: int) -> bytes:
    """The IHDR chunk of an 8-bit RGB image, remembered per size (a few sizes in practice)."""
    chunk = _IHDRS.get((width, height))
    if chunk is None:
        if len(_IHDRS) >= 256:
            _IHDRS.clear()
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        chunk = _IHDRS[(width, height)] = _chunk(b"IHDR", ihdr)
    return chunk


def _png_info(data: bytes) -> ImageInfo:
    pos = 8
    width = height = depth = ctype = 0
    palette = b""
    idat: list[bytes] = []
    solid: tuple[int, int, int] | None = None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR" and len(body) >= 13:
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
        elif kind == b"PLTE":
            palette = body
        elif kind == b"tEXt" and body.startswith(SOLID_KEY.encode() + b"\x00"):
            try:
                r, g, b = (int(v) for v in body.split(b"\x00", 1)[1].split(b","))
                solid = (r, g, b)
            except ValueError:
                solid = None
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if width <= 0 or height <= 0:
        raise UnidentifiedImageError("bad PNG header")
    has_alpha = ctype in (4, 6)
    if solid is not None:
        return ImageInfo(width, height, solid, has_alpha, True)
    return ImageInfo(width, height, _first_pixel(b"".join(idat), depth, ctype, palette), has_alpha)


def _first_pixel(idat: bytes, depth: int, ctype: int, palette: bytes) -> tuple[int, int, int]:
    # Every PNG filter leaves the first pixel of the first row unchanged (no left/up neighbours),
    # so decompressing a handful of bytes is enough to know its colour.
    try:
        raw = zlib.decompressobj().decompress(idat, 16)
    except zlib.error:
        return _GRAY
    px = raw[1:]
    step = 2 if depth == 16 else 1
    try:
        if ctype in (2, 6):
            return (px[0], px[step], px[2 * step])
        if ctype in (0, 4):
            v = px[0] if depth >= 8 else (px[0] >> (8 - depth)) * 255 // ((1 << depth) - 1)
            return (v, v, v)
        if ctype == 3:
            idx = px[0] if depth == 8 else px[0] >> (8 - depth)
            r, g, b = palette[3 * idx : 3 * idx + 3]
            return (r, g, b)
    except (IndexError, ValueError):
        pass
    return _GRAY


def _jpeg_size(data: bytes) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            pos += 1
            continue
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            pos += 1 if marker == 0xFF else 2
            continue
        (seg,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + seg
    raise UnidentifiedImageError("no JPEG frame header")


def _webp_size(data: bytes) -> tuple[int, int]:
    kind = data[12:16]
    if kind == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if kind == b"VP8L" and len(data) >= 25:
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    raise UnidentifiedImageError("unknown WebP chunk")


def sniff_image(data: bytes) -> ImageInfo:
    """Identify PNG, JPEG, GIF, BMP or WebP bytes; raise UnidentifiedImageError otherwise."""
    try:
        if data.startswith(PNG_MAGIC):
            return _png_info(data)
        if data.startswith(b"\xff\xd8"):
            w, h = _jpeg_size(data)
            return ImageInfo(w, h, _GRAY)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
            return ImageInfo(w, h, _GRAY)
        if data.startswith(b"BM") and len(data) >= 26:
            w, h = struct.unpack("<ii", data[18:26])
            return ImageInfo(abs(w), abs(h), _GRAY)
        if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            w, h = _webp_size(data)
            return ImageInfo(w, h, _GRAY)
    except (struct.error, IndexError) as ex:
        raise UnidentifiedImageError(str(ex)) from ex
    raise UnidentifiedImageError("unknown image format")


class _BitWriter:
    def __init__(self) -> None:
        self.acc = 0
        self.nbits = 0

    def put(self, value: int, bits: int) -> None:
        self.acc |= value << self.nbits  # VP8L packs bits least-significant first
        self.nbits += bits

    def getvalue(self) -> bytes:
        return self.acc.to_bytes((self.nbits + 7) // 8, "little")


def encode_webp_solid(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """Encode a solid-colour lossless (VP8L) WebP: five one-symbol prefix codes, 0 bits a pixel."""
    if not (1 <= width <= 16384 and 1 <= height <= 16384):
        raise ValueError("WebP dimensions must be 1..16384")
    bw = _BitWriter()
    bw.put(width - 1, 14)
    bw.put(height - 1, 14)
    bw.put(0, 1)  # alpha_is_used
    bw.put(0, 3)  # version
    bw.put(0, 1)  # no transform
    bw.put(0, 1)  # no colour cache
    bw.put(0, 1)  # no meta prefix codes
    r, g, b = rgb
    for symbol in (g, r, b, 255):
        bw.put(1, 1)  # simple code
        bw.put(0, 1)  # one symbol
        bw.put(1, 1)  # 8-bit symbol
        bw.put(symbol, 8)
    bw.put(1, 1)  # distance code: simple, one 1-bit symbol 0
    bw.put(0, 1)
    bw.put(0, 1)
    bw.put(0, 1)
    payload = b"\x2f" + bw.getvalue()
    if len(payload) % 2:
        payload_padded = payload + b"\x00"
    else:
        payload_padded = payload
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload_padded
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk
