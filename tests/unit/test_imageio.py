"""Safe image loader against hostile and odd inputs, all made in tmp_path."""
import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import imageio
from edge.errors import ImageError
from edge.imageio import header_size, load_image


def encode(ext, img, params=()):
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def photo(h=48, w=64):
    y, x = np.mgrid[0:h, 0:w]
    return np.dstack([x * 4 % 256, y * 5 % 256, (x + y) * 2 % 256]).astype(np.uint8)


def _seg(marker, payload):
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def flat_jpeg(values, size=16):
    """A baseline JPEG of a flat image with one component per value (4 values = Adobe CMYK),
    written by hand because OpenCV cannot encode CMYK. Quantisation 1, one DC code per
    category, and the AC table holds only end-of-block."""
    n = len(values)
    dcs = [8 * (v - 128) for v in values]  # the DCT's DC term of a flat 8x8 block
    cats = sorted({abs(d).bit_length() for d in dcs} | {0})
    codes = {c: format(i, "04b") for i, c in enumerate(cats)}
    bits, prev = [], [0] * n
    for _ in range((size // 8) ** 2):
        for c in range(n):
            diff, prev[c] = dcs[c] - prev[c], dcs[c]
            k = abs(diff).bit_length()
            bits.append(codes[k])
            if k:
                bits.append(format(diff if diff > 0 else diff + (1 << k) - 1, f"0{k}b"))
            bits.append("0")  # end of block
    s = "".join(bits)
    s += "1" * (-len(s) % 8)
    scan = bytes(int(s[i:i + 8], 2) for i in range(0, len(s), 8)).replace(b"\xff", b"\xff\x00")
    counts = [0] * 16
    counts[3] = len(cats)
    return (b"\xff\xd8"
            + _seg(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, 0))  # transform 0: plain CMYK
            + _seg(0xDB, b"\x00" + b"\x01" * 64)
            + _seg(0xC0, struct.pack(">BHHB", 8, size, size, n) + b"".join(bytes([i + 1, 0x11, 0]) for i in range(n)))
            + _seg(0xC4, b"\x00" + bytes(counts) + bytes(cats))
            + _seg(0xC4, b"\x10" + bytes([1] + [0] * 15) + b"\x00")
            + _seg(0xDA, bytes([n]) + b"".join(bytes([i + 1, 0]) for i in range(n)) + b"\x00\x3f\x00")
            + scan + b"\xff\xd9")


def png_claiming(width, height):
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp"])
def test_formats_decode_to_bgr_uint8(tmp_path, ext):
    img = photo()
    p = tmp_path / f"a{ext}"
    p.write_bytes(encode(ext, img))
    out = load_image(p)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    if ext in (".png", ".bmp"):
        assert np.array_equal(out, img)
    assert header_size(p.read_bytes())[1:] == (64, 48)


def test_lossy_webp_header():
    data = encode(".webp", photo(), [cv2.IMWRITE_WEBP_QUALITY, 80])
    assert data[12:16] == b"VP8 "
    assert header_size(data) == ("webp", 64, 48)


def test_raw_bytes_and_wrong_extension(tmp_path):
    data = encode(".png", photo())
    assert load_image(data).shape == (48, 64, 3)
    p = tmp_path / "actually_png.jpg"
    p.write_bytes(data)
    assert np.array_equal(load_image(p), photo())


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.jpg: empty file"):
        load_image(p)


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("not an image at all\n")
    with pytest.raises(ImageError, match="notes.jpg: not a JPEG, PNG, BMP or WebP image"):
        load_image(p)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp"])
def test_truncated(tmp_path, ext):
    data = encode(ext, photo())
    p = tmp_path / f"cut{ext}"
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError, match=f"cut\\{ext}: corrupt or truncated"):
        load_image(p)


def test_header_cut_short(tmp_path):
    p = tmp_path / "stub.png"
    p.write_bytes(encode(".png", photo())[:14])
    with pytest.raises(ImageError, match="stub.png: png header cut short"):
        load_image(p)


def test_16_bit_png_is_scaled_to_8_bit(tmp_path):
    ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    p = tmp_path / "deep.png"
    p.write_bytes(encode(".png", np.dstack([ramp, ramp // 2, 65535 - ramp])))
    out = load_image(p)
    assert out.dtype == np.uint8
    assert np.abs(out[..., 0].astype(int) - ramp / 257).max() <= 1
    assert np.abs(out[..., 2].astype(int) - (65535 - ramp) / 257).max() <= 1


def test_grey_and_alpha_become_three_channels(tmp_path):
    img = photo()
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    (tmp_path / "g.png").write_bytes(encode(".png", grey))
    out = load_image(tmp_path / "g.png")
    assert out.shape == (48, 64, 3) and np.array_equal(out[..., 1], grey) and np.array_equal(out[..., 0], out[..., 2])
    rgba = np.dstack([img, np.full(img.shape[:2], 128, np.uint8)])
    (tmp_path / "a.png").write_bytes(encode(".png", rgba))
    assert np.array_equal(load_image(tmp_path / "a.png"), img)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    # Adobe CMYK stores inverted ink: 255 = no ink. No ink is white; full yellow ink (Y=0) is yellow.
    p.write_bytes(flat_jpeg((255, 255, 255, 255)))
    white = load_image(p)
    assert white.shape == (16, 16, 3) and np.all(white >= 250)
    p.write_bytes(flat_jpeg((255, 255, 0, 255)))
    yellow = load_image(p)
    assert yellow[0, 0, 0] <= 5 and yellow[0, 0, 1] >= 250 and yellow[0, 0, 2] >= 250


def test_huge_png_header_refused_before_decoding(tmp_path, monkeypatch):
    p = tmp_path / "bomb.png"
    p.write_bytes(png_claiming(100_000, 100_000))

    def no_decode(*a, **k):
        raise AssertionError("the decoder must not see a bomb")

    monkeypatch.setattr(imageio.cv2, "imdecode", no_decode)
    with pytest.raises(ImageError, match="bomb.png: 100000x100000 png image is over the 40 megapixel limit"):
        load_image(p)


def test_huge_jpeg_and_webp_headers_refused(tmp_path):
    data = bytearray(encode(".jpg", photo()))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 60000, 60000)
    with pytest.raises(ImageError, match="60000x60000 jpeg"):
        load_image(bytes(data))
    vp8x = b"RIFF" + struct.pack("<I", 22) + b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 \
        + (16383).to_bytes(3, "little") + (16383).to_bytes(3, "little")
    with pytest.raises(ImageError, match="16384x16384 webp"):
        load_image(vp8x)


def test_real_image_over_a_lower_limit():
    data = encode(".png", photo())  # 3072 pixels, compresses to almost nothing
    with pytest.raises(ImageError, match="over the 0.003 megapixel limit"):
        load_image(data, max_pixels=3000)


def test_header_lies_about_size():
    data = bytearray(encode(".bmp", photo()))
    struct.pack_into("<i", data, 22, -48)  # top-down rows: same size, decodes upside down
    assert np.array_equal(load_image(bytes(data)), photo()[::-1])


def test_folder_and_missing(tmp_path):
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="missing.jpg: file not found"):
        load_image(tmp_path / "missing.jpg")


SEEDS = [encode(".jpg", photo(24, 32)), encode(".png", photo(24, 32)), encode(".webp", photo(24, 32)),
         encode(".bmp", photo(24, 32)), flat_jpeg((1, 2, 3, 4), size=8)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), cuts=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       keep=st.floats(0.0, 1.0))
def test_mutated_images_decode_or_raise_image_error(seed, cuts, keep):
    data = bytearray(seed[: max(1, int(len(seed) * keep))])
    for pos, val in cuts:
        data[pos % len(data)] = val
    try:
        out = load_image(bytes(data))
    except ImageError:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


def test_a_device_is_refused_before_a_byte_is_read():
    """/dev/zero reports size 0 and never ends: reading it whole ran the machine out of memory.
    Run in a child with its address space capped, so a regression fails instead of exhausting memory."""
    import resource
    import subprocess
    import sys

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    code = "from edge.imageio import load_image\ntry:\n    load_image('/dev/zero')\nexcept Exception as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, preexec_fn=cap)
    assert "/dev/zero: is not a regular file" in out.stdout, (out.returncode, out.stdout, out.stderr[-500:])


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    import os

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file") as e:
        load_image(fifo)
    assert str(fifo) in str(e.value)
