"""Reading and writing files: slime's image and mask readers and its PNG writers.

Proves that read_image gives (3, H, W) float RGB in [0, 1] from RGB, RGBA, grey, 16-bit, palette,
CMYK, GIF and EXIF-rotated files; that read_mask gives class labels (indexed and grey PNG,
grey-looking RGB, .npy) or colours, and that colours_to_labels maps colour masks to labels; that
unreadable files are refused with one sentence naming the file; that the indexed PNG and overlay
writers produce what they promise, band by band; and that commit writes whole files or none. Every
input file is built here with PIL / numpy; no checkpoint is needed.

    python -m pytest -q tests/test_io.py
"""

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import slime
from slime import (
    VOC_PALETTE,
    SlimeError,
    colors_to_labels,
    commit,
    mask_image,
    overlay_image,
    png,
    read_image,
    read_mask,
)


def rng_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(tmp_path, name, im, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return str(path)


def exif_rotated(mode, color_left, color_right):
    """A 20 wide x 10 high image, left half / right half, tagged EXIF orientation 6
    (rotate 90 clockwise)."""
    im = Image.new(mode, (20, 10), color_left)
    im.paste(color_right, (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    return im, exif.tobytes()


def animated_gif(tmp_path):
    frames = [Image.new("P", (8, 6), i) for i in (1, 2)]
    for f in frames:
        f.putpalette(VOC_PALETTE.tobytes())
    # optimize=False keeps the palette indices as they are
    return save(
        tmp_path,
        "anim.gif",
        frames[0],
        save_all=True,
        append_images=frames[1:],
        duration=100,
        optimize=False,
    )


# ----------------------------------------------------------------------------- read_image
def test_read_image_rgb_png(tmp_path):
    rgb = rng_rgb(5, 7)
    x = read_image(save(tmp_path, "a.png", Image.fromarray(rgb)))
    assert x.dtype == torch.float32 and x.shape == (3, 5, 7)
    assert torch.equal(x, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


def test_read_image_rgba_drops_alpha(tmp_path):
    rgba = np.concatenate([rng_rgb(4, 6), np.zeros((4, 6, 1), np.uint8)], -1)  # fully transparent
    x = read_image(save(tmp_path, "a.png", Image.fromarray(rgba)))
    assert torch.equal(x, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).float() / 255)


def test_read_image_gray_and_16bit(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    x = read_image(save(tmp_path, "g.png", Image.fromarray(gray)))
    assert (
        x.shape == (3, 3, 4)
        and torch.equal(x[0], x[2])
        and torch.allclose(x[1], torch.from_numpy(gray) / 255.0)
    )
    g16 = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    x = read_image(save(tmp_path, "g16.png", Image.fromarray(g16)))
    assert x.shape == (3, 2, 2) and torch.equal(x[0], x[1])
    assert torch.allclose(x[0], torch.tensor([[0, 1000 / 65535], [32768 / 65535, 1.0]]))


def test_read_image_palette_with_transparency(tmp_path):
    im = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8))
    im.putpalette(VOC_PALETTE.tobytes())
    x = read_image(save(tmp_path, "p.png", im, transparency=0))
    assert torch.equal(
        x.permute(1, 2, 0).reshape(4, 3), torch.from_numpy(VOC_PALETTE[:4]).float() / 255
    )


@pytest.mark.filterwarnings(
    "ignore:.*like a mask"
)  # one flat colour: the warning is right, and beside the point
def test_read_image_cmyk_jpeg(tmp_path):
    x = read_image(
        save(tmp_path, "c.jpg", Image.new("CMYK", (8, 8), (255, 0, 0, 0)), quality=100)
    )  # cyan
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x.mean((1, 2)), torch.tensor([0.0, 1.0, 1.0]), atol=0.02)


def test_read_image_gif_first_frame(tmp_path):
    x = read_image(animated_gif(tmp_path))
    assert x.shape == (3, 6, 8) and torch.equal(x[:, 0, 0], torch.tensor([128, 0, 0]) / 255.0)


@pytest.mark.filterwarnings(
    "ignore:.*like a mask"
)  # black and white halves: a mask, to read_image's eye
def test_read_image_exif_rotation(tmp_path):
    im, exif = exif_rotated("RGB", (0, 0, 0), (255, 255, 255))
    x = read_image(save(tmp_path, "r.jpg", im, exif=exif, quality=95))
    assert x.shape == (3, 20, 10)  # rotated: 10 wide, 20 high
    assert x[:, :8].mean() < 0.1 and x[:, 12:].mean() > 0.9  # the left half is now on top


def test_read_mask_exif_rotation(tmp_path):
    im, exif = exif_rotated("L", 0, 255)
    m = read_mask(save(tmp_path, "r.png", im, exif=exif))
    assert m.shape == (20, 10) and m.dtype == np.int64
    assert m[:8].mean() < 10 and m[12:].mean() > 245


def test_read_mask_gif_first_frame(tmp_path):
    m = read_mask(animated_gif(tmp_path))
    assert m.shape == (6, 8) and (m == 1).all()


@pytest.mark.parametrize("read", [read_image, read_mask])
def test_read_errors(tmp_path, read):
    """Each failure is `<path>: <reason>`, the reason the OS's or PIL's own, the quoted path taken
    out."""
    missing = tmp_path / "nope.png"
    with pytest.raises(SlimeError, match=f"^{re.escape(str(missing))}: No such file or directory$"):
        read(missing)
    with pytest.raises(SlimeError, match=f"^{re.escape(str(tmp_path))}: Is a directory$"):
        read(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(SlimeError, match=r"empty.png: cannot identify image file$"):
        read(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("hello, not an image\n")
    with pytest.raises(SlimeError, match=r"text.png: cannot identify image file$"):
        read(tmp_path / "text.png")
    save(tmp_path, "full.jpg", Image.fromarray(rng_rgb(64, 64)), quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        SlimeError, match=r"cut.jpg: image file is truncated \(\d+ bytes not processed\)$"
    ) as e:
        read(tmp_path / "cut.jpg")
    assert str(e.value).startswith(str(tmp_path / "cut.jpg")) and "\n" not in str(e.value)
    (tmp_path / "cut.png").write_bytes(data[:100])  # a JPEG header cut short, named .png
    with pytest.raises(SlimeError, match=r"cut.png: Truncated File Read$"):
        read(tmp_path / "cut.png")


def test_pixel_limit_is_slimes_from_the_header_and_pils_is_off(tmp_path, monkeypatch):
    """slime's MAX_PIXELS, checked from the header before any decoding, in slime's words; PIL's
    "decompression bomb" limit (179 MP, below a panorama) is off, and so is its warning (89 MP,
    below a 12000x9000 photo)."""
    import warnings

    assert Image.MAX_IMAGE_PIXELS is None and slime.MAX_PIXELS == 250_000_000
    monkeypatch.setattr(slime, "MAX_PIXELS", 300_000)
    Image.fromarray(rng_rgb(12, 12)).save(tmp_path / "big.png")
    Image.new("RGB", (1000, 400)).save(tmp_path / "huge.png")  # 0.4 MP: over the limit here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "big.png").shape == (3, 12, 12)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda im: decoded.append(im))
    for read in (read_image, read_mask):
        with pytest.raises(SlimeError) as e:
            read(tmp_path / "huge.png")
        assert str(e.value) == (
            f"{tmp_path / 'huge.png'} has 0.4 megapixels, over slime's limit of 0.3 "
            "(as float32 it alone takes 12 bytes a pixel): shrink it"
        )
    assert decoded == []  # refused from the header


def test_an_image_of_a_few_flat_colours_is_read_with_a_warning_that_it_looks_like_a_mask(tmp_path):
    """A mask given where an image belongs is read, but named: at most 78 colours, over 64 pixels
    each."""
    labels = np.zeros((17, 16), np.uint8)
    labels[8:] = 1
    labels[:, 8:] += 2  # 4 colours of 68 pixels on average
    with pytest.warns(UserWarning) as record:
        x = read_image(save(tmp_path, "m.png", Image.fromarray(VOC_PALETTE[labels])))
    assert [str(w.message) for w in record] == [
        f"{tmp_path / 'm.png'} has only 4 colours, like a mask"
    ]
    assert x.shape == (3, 17, 16)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # 4 colours of 60 pixels on average: a small image, no warning
        read_image(save(tmp_path, "small.png", Image.fromarray(VOC_PALETTE[labels[2:]])))


# ----------------------------------------------------------------------------- read_mask
def test_read_mask_indexed_png_round_trip_keeps_255(tmp_path):
    labels = np.array([[0, 1, 2], [3, 255, 0]])
    path = str(tmp_path / "m.png")
    write_index_png(path, labels)
    m = read_mask(path)
    assert m.dtype == np.int64 and np.array_equal(m, labels)
    with Image.open(path) as im:
        assert im.mode == "P" and np.array_equal(np.array(im), labels)
        assert np.array_equal(np.array(im.getpalette(), np.uint8).reshape(-1, 3), VOC_PALETTE)


def test_read_mask_gray_png_and_gray_looking_rgb(tmp_path):
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    assert np.array_equal(read_mask(save(tmp_path, "g.png", Image.fromarray(labels))), labels)
    rgb = np.repeat(labels[..., None], 3, -1)
    m = read_mask(save(tmp_path, "rgb.png", Image.fromarray(rgb)))
    assert m.shape == (2, 2) and m.dtype == np.int64 and np.array_equal(m, labels)


def test_read_mask_rgba_colours(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0, :3] = (10, 20, 30)
    m = read_mask(save(tmp_path, "c.png", Image.fromarray(rgba)))
    assert m.shape == (2, 2, 3) and m.dtype == np.uint8 and tuple(m[0, 0]) == (10, 20, 30)


def test_read_mask_npy(tmp_path):
    np.save(tmp_path / "ok.npy", np.array([[0, 1], [255, 2]], np.uint8))
    m = read_mask(tmp_path / "ok.npy")
    assert m.dtype == np.int64 and m.tolist() == [[0, 1], [255, 2]]
    np.save(tmp_path / "b.npy", np.eye(2, dtype=bool))
    assert read_mask(tmp_path / "b.npy").tolist() == [[1, 0], [0, 1]]
    for name, array, what in [
        ("f.npy", np.zeros((2, 2), np.float32), "float32 (2, 2)"),
        ("3d.npy", np.zeros((2, 2, 3), np.uint8), "uint8 (2, 2, 3)"),
        ("big.npy", np.array([[0, 300]], np.int32), "int32 (1, 2)"),
        ("neg.npy", np.array([[0, -1]], np.int32), "int32 (1, 2)"),
    ]:
        np.save(tmp_path / name, array)
        with pytest.raises(SlimeError) as e:
            read_mask(tmp_path / name)
        assert (
            str(e.value) == f"{tmp_path / name}: a mask is a 2-D array of labels 0..255, not {what}"
        )
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(SlimeError, match=r"empty.npy: No data left in file$"):
        read_mask(tmp_path / "empty.npy")
    with pytest.raises(SlimeError, match="none.npy: No such file or directory$"):
        read_mask(tmp_path / "none.npy")
    np.save(tmp_path / "obj.npy", np.array([[None]], dtype=object), allow_pickle=True)
    with pytest.raises(
        SlimeError, match="obj.npy: Object arrays cannot be loaded when allow_pickle=False$"
    ):
        read_mask(tmp_path / "obj.npy")  # never unpickled


# ----------------------------------------------------------------------------- colors_to_labels
def test_voc_palette():
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    assert VOC_PALETTE[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert VOC_PALETTE[15].tolist() == [192, 128, 128] and VOC_PALETTE[255].tolist() == [
        224,
        224,
        192,
    ]
    assert len({tuple(c) for c in VOC_PALETTE.tolist()}) == 256


def test_colors_voc_void_is_ignore_not_a_class(tmp_path):
    """VOC's void colour (224, 224, 192) means ignore (255) in colour masks, with or without a
    palette."""
    idx = np.array([[0, 1, 255], [2, 255, 0]])
    m = read_mask(save(tmp_path, "voc.png", Image.fromarray(VOC_PALETTE[idx])))
    assert m.shape == (2, 3, 3)
    (labels,), palette = colors_to_labels([m])
    assert palette == [
        [0, 0, 0],
        [0, 128, 0],
        [128, 0, 0],
    ]  # black first, then sorted: void is no class
    assert labels.dtype == np.int64 and labels.tolist() == [[0, 2, 255], [1, 255, 0]]
    (labels,), _ = colors_to_labels([m], VOC_PALETTE[:3].tolist())
    assert np.array_equal(labels, idx)


def test_colors_arbitrary_black_first_then_sorted():
    a = np.array([[[0, 0, 0], [200, 5, 5]], [[7, 7, 9], [200, 5, 5]]], np.uint8)
    (labels,), palette = colors_to_labels([a])
    assert palette == [[0, 0, 0], [7, 7, 9], [200, 5, 5]]
    assert labels.tolist() == [[0, 2], [1, 2]]


def test_colors_shared_mapping_and_labels_pass_through():
    a = np.array([[[0, 0, 0], [50, 60, 70]]], np.uint8)
    b = np.array([[[9, 9, 9], [50, 60, 70]]], np.uint8)
    plain = np.array([[0, 3]])
    (la, lp, lb), palette = colors_to_labels([a, plain, b])
    assert palette == [[0, 0, 0], [9, 9, 9], [50, 60, 70]]
    assert la.tolist() == [[0, 2]] and lb.tolist() == [[1, 2]] and lp is plain
    assert colors_to_labels([plain]) == ([plain], None)


def test_colors_given_palette():
    a = np.array([[[0, 0, 0], [1, 2, 3], [4, 5, 6]]], np.uint8)
    (labels,), palette = colors_to_labels([a], palette=[[4, 5, 6], [0, 0, 0], [1, 2, 3]])
    assert labels.tolist() == [[1, 2, 0]] and palette == [[4, 5, 6], [0, 0, 0], [1, 2, 3]]
    bad = np.array([[[0, 0, 0], [9, 9, 9], [9, 9, 9], [8, 8, 8]]], np.uint8)
    with pytest.raises(SlimeError) as e:
        colors_to_labels([bad], palette=[[0, 0, 0]], names=["m.png"])
    assert (
        str(e.value) == "m.png has colours that are not in the palette, e.g. (8, 8, 8), (9, 9, 9)"
    )
    with pytest.raises(SlimeError) as e:
        colors_to_labels([bad], palette=[[0, 0, 0]], names=["m.png"], source="labelmap.txt")
    assert (
        str(e.value) == "m.png has colours that are not in labelmap.txt, e.g. (8, 8, 8), (9, 9, 9)"
    )


def test_colors_too_many_name_the_mask_with_the_most():
    """Black is class 0 even where no mask holds it: 76 colours and black are 77 classes, 77 colours
    too many. The refusal names the mask with the most colours. Each colour is a 4x4 block: no
    sliver."""
    colors = np.stack([np.arange(1, 78), np.full(77, 3), np.full(77, 5)], -1).astype(np.uint8)[None]
    colors = colors.repeat(4, 0).repeat(4, 1)  # (4, 308, 3)
    few = colors[:, :16]
    assert len(colors_to_labels([colors[:, : 76 * 4]])[1]) == 77
    with pytest.raises(SlimeError) as e:
        colors_to_labels([few, colors, few], names=["a.png", "soft.png", "b.png"])
    assert (
        str(e.value) == "the colours of soft.png and the others make 78 classes, over 77"
    )  # black included


def test_anti_aliased_colours_are_refused_by_their_count():
    """Two shapes drawn smooth (at 4x, then shrunk with LANCZOS): the blends line the edges between
    the drawn colours and the background, one pixel wide, and are refused; the same drawing without
    smoothing is not."""
    big = Image.new("RGB", (256, 256))
    draw = ImageDraw.Draw(big)
    draw.ellipse([20, 20, 140, 140], fill=(200, 0, 0))
    draw.rectangle([120, 120, 230, 200], fill=(0, 0, 200))
    sharp = np.asarray(big.resize((64, 64), Image.NEAREST))
    soft = np.asarray(big.resize((64, 64), Image.LANCZOS))
    n = len(np.unique(soft.reshape(-1, 3), axis=0))
    assert n > 10  # what a drawing tool's smoothing leaves
    labels, palette = colors_to_labels([sharp], names=["sharp.png"])
    assert len(palette) == 3 and set(np.unique(labels[0])) == {0, 1, 2}
    with pytest.raises(SlimeError) as e:
        colors_to_labels([sharp, soft], names=["sharp.png", "soft.png"])
    assert str(e.value) == (
        f"soft.png has {n - 3} colours only along the edges between others (anti-aliasing): "
        "save it unsmoothed, or name its colours in a labelmap.txt"
    )
    # with a labelmap naming the colours (palette given), a thin part is the user's word: not
    # checked here
    line = np.zeros((8, 8, 3), np.uint8)
    line[:, 4] = (200, 0, 0)  # a 1-pixel-wide part
    assert colors_to_labels([line], palette=[[0, 0, 0], [200, 0, 0]])[0][0][0, 4] == 1


@pytest.mark.parametrize(
    "mode, name, n",
    [
        ("RGB", "photo.png", "4,096"),
        ("L", "photo.png", "256"),
        ("F", "photo.tif", "256"),
        ("RGB", "photo.jpg", ""),
    ],
)
def test_a_photo_given_as_a_mask_is_named_for_what_it_is(tmp_path, mode, name, n):
    """Thousands of colours, or more grey values than SD has tokens, are no mask: the image and its
    mask were swapped, or a photo sits in the --masks folder. A JPEG photo is named a photo, not a
    lossy mask."""
    pixels = rng_rgb(64, 64)
    photo = Image.fromarray(
        pixels if mode == "RGB" else pixels[..., 0].astype("float32" if mode == "F" else "uint8")
    )
    with pytest.raises(SlimeError) as e:
        read_mask(save(tmp_path, name, photo))
    assert re.fullmatch(
        re.escape(f"{tmp_path / name} holds {n}")
        + (r"\d,\d{3}" if not n else "")
        + " distinct values, so it is "
        "a photo, not a mask \\(or its edges are anti-aliased\\): "
        "give each image first, its mask second",
        str(e.value),
    ), str(e.value)


def test_a_lossy_mask_is_refused_and_a_float_mask_of_few_values_read_as_labels(tmp_path):
    """JPEG invents colours at every edge, each a class of its own; a float TIFF of class values is
    labels."""
    with pytest.raises(SlimeError) as e:
        read_mask(save(tmp_path, "m.jpg", Image.new("L", (64, 64), 0)))
    assert (
        str(e.value)
        == f"{tmp_path / 'm.jpg'} is stored lossily (JPEG); save the mask as PNG or .npy"
    )
    # a colour mask as JPEG: 3,340 colours, from compression at the edges of two shapes, is a mask,
    # not a photo
    m = np.zeros((512, 512, 3), np.uint8)
    yy, xx = np.mgrid[:512, :512]
    m[100:300, 50:400], m[(yy - 380) ** 2 + (xx - 250) ** 2 < 90**2] = (200, 30, 30), (30, 180, 60)
    with pytest.raises(SlimeError) as e:
        read_mask(save(tmp_path, "shapes.jpg", Image.fromarray(m)))
    assert (
        str(e.value)
        == f"{tmp_path / 'shapes.jpg'} is stored lossily (JPEG); save the mask as PNG or .npy"
    )
    labels = np.array([[0, 1, 2], [2, 1, 0]])
    m = read_mask(save(tmp_path, "m.tif", Image.fromarray(labels.astype(np.float32))))
    assert m.dtype == np.int64 and np.array_equal(m, labels)


# ----------------------------------------------------------------------------- writing
def write_index_png(path, labels):
    commit({path: png(mask_image(labels))})


def write_overlay(path, image, labels, parts, band=256):
    commit({path: png(overlay_image(image, labels, parts, band=band))})


def test_write_index_png(tmp_path):
    labels = np.random.default_rng(0).integers(0, 256, (7, 9))
    path = tmp_path / "out.png"
    write_index_png(path, labels)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "P" and np.array_equal(np.array(im), labels)
        assert np.array_equal(np.array(im.getpalette(), np.uint8).reshape(-1, 3), VOC_PALETTE)
    assert os.listdir(tmp_path) == ["out.png"]


@pytest.mark.parametrize("h,w", [(64, 128), (200, 300)])
def test_write_overlay(tmp_path, h, w):
    """Big enough for the legend (6 px text on small images, two lines) to leave the checked regions
    free."""
    rgb = rng_rgb(h, w)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    labels = np.zeros((h, w), np.int64)
    labels[h // 2 :, w // 2 :] = 1  # class 1 in the bottom-right quarter
    path = tmp_path / "overlay.png"
    write_overlay(path, image, labels, ["background", "wheel"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (w, h)
        out = np.array(im)
    # the legend covers the top-left corner (its dark box); elsewhere background equals the image
    assert tuple(out[0, 0]) == (32, 32, 32)
    assert np.array_equal(out[h - 40 : h - 2, 2 : w // 2 - 2], rgb[h - 40 : h - 2, 2 : w // 2 - 2])
    assert np.array_equal(out[2 : h // 2 - 2, w // 2 + 40 :], rgb[2 : h // 2 - 2, w // 2 + 40 :])
    # tinted 50% with VOC colour 1 inside the part, white on its boundary
    expect = np.round(0.5 * rgb + 0.5 * VOC_PALETTE[1]).astype(int)
    assert (
        np.abs(
            out[h // 2 + 1 :, w // 2 + 1 :].astype(int) - expect[h // 2 + 1 :, w // 2 + 1 :]
        ).max()
        <= 1
    )
    assert (out[h // 2 :, w // 2 - 1] == 255).all() and (out[h // 2 - 1, w // 2 :] == 255).all()


def test_the_legend_lists_every_part_even_when_absent(tmp_path):
    """Nothing found: the legend still shows all 4 parts (4 lines of 8 px at this size), not
    "background" alone."""
    image = torch.from_numpy(rng_rgb(200, 300)).permute(2, 0, 1).float() / 255
    parts = ["background", "head", "suit", "flag"]
    out = np.array(overlay_image(image, np.zeros((200, 300), np.int64), parts))
    assert (out[:35, 0] == 32).all() and not (out[36:, 0] == 32).all()


@pytest.mark.parametrize(
    "h, w, parts, box",
    [(512, 512, 6, 124), (512, 512, 10, 153), (96, 128, 6, None), (16, 16, 2, None)],
)
def test_the_legend_scales_with_the_image_and_never_hides_a_third_of_it(h, w, parts, box):
    """16 px text at 512 (6 parts: 6 lines of 20 px); fewer pixels per line when many parts must fit
    in a third of the height; on a small image, where even 6 px text would hide more than a third,
    no legend at all."""
    image = torch.full((3, h, w), 0.5)
    out = np.array(
        overlay_image(image, np.zeros((h, w), np.int64), [f"p{i}" for i in range(parts)])
    )
    dark = (out[:, 0] == 32).all(-1)
    if box is None:
        assert not dark.any() and (out == 128).all()  # the image as it is
    else:
        assert dark[: box + 1].all() and not dark[box + 1 :].any() and box < h / 3


def test_write_overlay_band_by_band_equals_whole(tmp_path):
    rgb = rng_rgb(50, 40)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    labels = np.random.default_rng(1).integers(0, 4, (50, 40)).astype(np.uint8)
    for band in (7, 50):
        write_overlay(
            tmp_path / f"{band}.png", image, labels, ["background", "a", "b", "c"], band=band
        )
    assert np.array_equal(
        np.array(Image.open(tmp_path / "7.png")), np.array(Image.open(tmp_path / "50.png"))
    )


def test_commit_writes_every_file_or_none(tmp_path, monkeypatch):
    """A write that fails (a folder that cannot be made, a full disk) or an interrupt between the
    renames' start and end leaves the targets as they were: no new file, no temp file, an existing
    target untouched. A missing folder is made."""
    import errno

    (tmp_path / "b.png").write_bytes(b"old")
    (tmp_path / "file").write_bytes(b"")
    blocked = tmp_path / "file" / "c.png"  # its folder is a file
    with pytest.raises(SlimeError) as e:
        commit({tmp_path / "a.png": b"new", tmp_path / "b.png": b"new", blocked: b"x"})
    assert str(e.value) == f"{blocked}: File exists"
    assert (
        sorted(os.listdir(tmp_path)) == ["b.png", "file"]
        and (tmp_path / "b.png").read_bytes() == b"old"
    )
    (tmp_path / "file").unlink()
    real_fsync, temps = os.fsync, []

    def full(fd):  # the disk fills up while the third file is written
        temps.append(sorted(os.listdir(tmp_path)))
        if len(temps) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SlimeError) as e:
        commit({tmp_path / "a.png": b"new", tmp_path / "b.png": b"new", tmp_path / "d.png": b"x"})
    assert str(e.value) == f"{tmp_path / 'd.png'}: No space left on device"
    pid = os.getpid()
    assert temps[-1] == [f".a.png.{pid}.tmp", f".b.png.{pid}.tmp", f".d.png.{pid}.tmp", "b.png"]
    assert sorted(os.listdir(tmp_path)) == ["b.png"] and (tmp_path / "b.png").read_bytes() == b"old"
    monkeypatch.setattr(os, "fsync", real_fsync)
    commit({tmp_path / "new" / "folder" / "e.png": b"e"})  # the folder is made
    assert (tmp_path / "new" / "folder" / "e.png").read_bytes() == b"e"
    assert os.listdir(tmp_path / "new" / "folder") == ["e.png"]
    (tmp_path / "new" / "folder" / "e.png").unlink()
    (tmp_path / "new" / "folder").rmdir()
    (tmp_path / "new").rmdir()
    real_replace = os.replace

    def interrupted(src, dst):  # Ctrl-C arrives before the first rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        commit({tmp_path / "a.png": b"new", tmp_path / "b.png": b"new"})
    assert sorted(os.listdir(tmp_path)) == ["b.png"] and (tmp_path / "b.png").read_bytes() == b"old"
    monkeypatch.setattr(os, "replace", real_replace)
    commit({tmp_path / "a.png": b"new", tmp_path / "b.png": b"new"})
    assert (
        sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]
        and (tmp_path / "b.png").read_bytes() == b"new"
    )


# ----------------------------------------------------------------------------- labelling tools
def test_a_labelmap_names_the_colours_in_its_order(tmp_path):
    """CVAT's labelmap.txt: comments and blank lines skipped, `name:r,g,b:parts:actions`, line
    i = class i; masks in its colours map to its classes, VOC's void colour to ignore."""
    (tmp_path / "labelmap.txt").write_text(
        "# label:color_rgb:parts:actions\n\n"
        "background:0,0,0::\nhead:250,50,50:eye,ear:\nsuit:40,40,200::\n"
    )
    names, colors = slime.read_labelmap(tmp_path / "labelmap.txt")
    assert names == ["background", "head", "suit"] and colors == [
        [0, 0, 0],
        [250, 50, 50],
        [40, 40, 200],
    ]
    rgb = np.array([[[250, 50, 50], [224, 224, 192]], [[0, 0, 0], [40, 40, 200]]], np.uint8)
    (labels,), _ = colors_to_labels([rgb], colors)
    assert labels.tolist() == [[1, 255], [0, 2]]
    assert slime.read_labelmap(tmp_path / "labelmap.txt") == slime.read_labelmap(
        tmp_path / "labelmap.txt"
    )
    for text, fragment in [
        (
            "background:0,0,0::\nhead:0,0,0::\n",
            "lists 2 labels; slime needs 2 to 77, each its colour",
        ),
        (
            "background:0,0,0::\nbackground:1,1,1::\n",
            "line 2: 'background:1,1,1::' is not `name:r,g,b::`, a new name",
        ),
        (
            "background:0,0,0::\nhead:1,2,300::\n",
            "line 2: 'head:1,2,300::' is not `name:r,g,b::`, a new name",
        ),
        (
            "background:0,0,0::\nhead:1,2::\n",
            "line 2: 'head:1,2::' is not `name:r,g,b::`, a new name",
        ),
        ("background:0,0,0::\n", "lists 1 label; slime needs 2 to 77, each its colour"),
    ]:
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(SlimeError) as e:
            slime.read_labelmap(tmp_path / "bad.txt")
        assert (
            str(e.value) == f"{tmp_path / 'bad.txt'}{',' * fragment.startswith('line')} {fragment}"
        )


def test_the_labelmap_is_found_beside_the_masks_or_at_the_export_root(tmp_path):
    export = tmp_path / "export"
    (export / "SegmentationClass").mkdir(parents=True)
    (export / "labelmap.txt").write_text("background:0,0,0::\na:1,1,1::\n")
    mask = export / "SegmentationClass" / "x.png"
    assert slime.find_labelmap([mask]) == str(export / "labelmap.txt")
    assert slime.find_labelmap([tmp_path / "elsewhere" / "x.png"]) is None
    assert slime.find_labelmap([mask], "given.txt") == "given.txt"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "labelmap.txt").write_text("background:0,0,0::\nb:2,2,2::\n")
    with pytest.raises(SlimeError, match="the masks come with different labelmap.txt files"):
        slime.find_labelmap([mask, tmp_path / "other" / "y.png"])


def test_indexed_masks_read_by_colour_when_a_labelmap_names_the_colours(tmp_path):
    im = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8))
    im.putpalette([0, 0, 0, 40, 40, 200, 250, 50, 50] + [0] * 759)
    im.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png").tolist() == [[0, 1], [2, 1]]  # indices, as before
    assert read_mask(tmp_path / "p.png", colors=True)[1, 0].tolist() == [250, 50, 50]
