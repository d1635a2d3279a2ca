"""Safe image loading for anything a user or an attacker can hand the gate (enrolment photos,
replay folders, CLI arguments).

The format is decided by content, never by the file name. Only formats whose dimensions we can
read from the header are accepted (JPEG, PNG, BMP, WebP), and the dimensions are checked before
the decoder allocates anything, so a small file that claims a huge image (a decompression bomb)
costs nothing. Decoding is cv2.imdecode with IMREAD_COLOR_BGR, which already turns grey and
alpha images into 3 channels, scales 16-bit samples to 8 bits, converts CMYK / YCCK JPEGs, applies
the EXIF orientation, and (OpenCV 5) refuses truncated files instead of padding them grey.
"""
from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageError

MAX_PIXELS = 40_000_000
MAX_FILE_BYTES = 64 * 1024 * 1024
FORMATS = "JPEG, PNG, BMP or WebP"


class NotARegularFile(OSError):
    """A device, FIFO or socket where a file was expected."""


class NotOwnerOnly(OSError):
    """A file its group or others may read or write, where a secret was expected."""

    def __init__(self, mode: int):
        super().__init__(errno.EACCES, "readable or writable by group or others")
        self.mode = mode & 0o7777


class FileTooLarge(OSError):
    def __init__(self, size: int):
        super().__init__(errno.EFBIG, os.strerror(errno.EFBIG))
        self.size = size  # as the file reported it, or as many bytes as were read when it grew


def read_refusal(e: OSError, what: str, limit: int, links_refused: bool = False) -> str:
    """Why read_regular_file could not read `what`, in words for the error that names the file."""
    if isinstance(e, NotOwnerOnly):
        return (f"{what} may be read or written by its group or others (mode {e.mode:04o}): it must be owner-only "
                f"like the gallery key (chmod 600)")
    if isinstance(e, FileNotFoundError):
        return f"{what} not found"
    if isinstance(e, IsADirectoryError):
        return f"{what} is a folder"
    if isinstance(e, NotARegularFile):
        return f"{what} is not a regular file (a device, FIFO or socket)"
    if isinstance(e, FileTooLarge):
        return f"{what} is larger than {limit} bytes"
    if links_refused and e.errno == errno.ELOOP:
        return f"{what} is a symbolic link: symlinks are refused"
    return f"cannot read {what}: {e.strerror}"


def read_regular_file(path: str | Path, limit: int, follow_symlinks: bool = True, owner_only: bool = False) -> bytes:
    """The bytes of the regular file at `path`, at most `limit` of them. The opened file is checked,
    not its name, and before any read: opened non-blocking, so a FIFO does not wait for a writer
    that never comes, then fstat'd, so a device such as /dev/zero (endless, size 0) is refused,
    and with `owner_only` a file whose group or others have any access (NotOwnerOnly).
    Raises FileNotFoundError, IsADirectoryError, NotARegularFile, NotOwnerOnly, FileTooLarge, or the
    OSError the system gave (ELOOP: a symlink, with follow_symlinks False; EIO: a failing disk or stick)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file", str(path))
        if owner_only and st.st_mode & 0o077:
            raise NotOwnerOnly(st.st_mode)
        if st.st_size > limit:
            raise FileTooLarge(st.st_size)
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)  # bounded even if the file grows after fstat
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileTooLarge(len(data))
    return data

# JPEG start-of-frame markers (C0-CF) minus DHT (C4), JPG (C8) and DAC (CC), which share the range
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NO_LENGTH = set(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length field


def sniff_format(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError("bad marker")
        while i < n - 1 and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        marker = data[i + 1]
        if marker in _NO_LENGTH:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data, before any frame header
            raise ValueError("no frame header")
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in _SOF:
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        if length < 2:
            raise ValueError("bad segment length")
        i += 2 + length
    raise ValueError("no frame header")


def _png_size(data: bytes) -> tuple[int, int]:
    length, kind, width, height = struct.unpack_from(">I4sII", data, 8)
    if kind != b"IHDR" or length != 13:
        raise ValueError("first chunk is not IHDR")
    return width, height


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack_from("<HH", data, 18)
    width, height = struct.unpack_from("<ii", data, 18)
    return width, abs(height)  # negative height = rows stored top-down


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("bad VP8 start code")
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise ValueError("bad VP8L signature")
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    raise ValueError(f"unknown WebP chunk {chunk!r}")


_SIZE_READERS = {"jpeg": _jpeg_size, "png": _png_size, "bmp": _bmp_size, "webp": _webp_size}


def header_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) read from the header alone; ValueError if it cannot be read."""
    fmt = sniff_format(data)
    if fmt is None:
        raise ValueError(f"not a {FORMATS} image")
    try:
        width, height = _SIZE_READERS[fmt](data)
    except (struct.error, IndexError) as e:
        raise ValueError(f"{fmt} header cut short") from e
    return fmt, int(width), int(height)


def load_image(src: str | Path | bytes, max_pixels: int = MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Decode a file path or raw bytes to BGR uint8 HxWx3; ImageError naming the file otherwise.

    `name` labels raw bytes in error messages (default: none)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        label, data = name, bytes(src)
    else:
        label = str(src)
        try:
            data = read_regular_file(src, MAX_FILE_BYTES)
        except FileNotFoundError:
            raise ImageError(label, "file not found") from None
        except IsADirectoryError:
            raise ImageError(label, "is a folder, not an image") from None
        except NotARegularFile:
            raise ImageError(label, "is not a regular file (a device, FIFO or socket), not an image") from None
        except FileTooLarge as e:
            raise ImageError(label, f"file of {e.size} bytes is larger than {MAX_FILE_BYTES}") from None
        except OSError as e:
            raise ImageError(label, f"cannot read: {e.strerror or e}") from None
    if not data:
        raise ImageError(label, "empty file")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(label, f"{len(data)} bytes is larger than {MAX_FILE_BYTES}")
    try:
        fmt, width, height = header_size(data)
    except ValueError as e:
        raise ImageError(label, str(e)) from None
    if width <= 0 or height <= 0:
        raise ImageError(label, f"{fmt} header gives no size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(label, f"{width}x{height} {fmt} image is over the {max_pixels / 1e6:g} megapixel limit")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_BGR)
    except cv2.error as e:
        raise ImageError(label, f"{fmt} decoder failed: {str(e).strip().splitlines()[-1]}") from None
    if img is None:
        raise ImageError(label, f"corrupt or truncated {fmt} image")
    # EXIF orientation may swap the axes; anything else means the header lied to the size check
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or \
            sorted(img.shape[:2]) != sorted((height, width)):
        raise ImageError(label, f"{fmt} decoded to {img.shape} {img.dtype}, header said {width}x{height}")
    return img
