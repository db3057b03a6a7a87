"""prepare_image: what becomes a shard sample, what is converted, what is rejected and why."""

import io

import pytest
from PIL import Image

from conftest import EXPECTED_BAD, EXPECTED_CONVERTED, jpeg, photos
from data_prep.images import BadImage, prepare_image


@pytest.mark.parametrize("validate", ["scaled", "full"])
def test_rgb_jpeg_keeps_its_original_bytes(bad_inputs, validate):
    data = bad_inputs["good_rgb.JPEG"]
    img = prepare_image(data, validate=validate)
    assert img.jpg == data and img.converted is None
    assert (img.width, img.height) == Image.open(io.BytesIO(data)).size


@pytest.mark.parametrize("name", sorted(EXPECTED_CONVERTED))
def test_convertible_inputs_become_rgb_jpeg(bad_inputs, name):
    img = prepare_image(bad_inputs[name])
    out = Image.open(io.BytesIO(img.jpg))
    assert out.format == "JPEG" and out.mode == "RGB"
    assert img.converted and (img.width, img.height) == out.size
    assert out.size == Image.open(io.BytesIO(bad_inputs[name])).size


def test_cmyk_conversion_keeps_the_colours(bad_inputs):
    cat = photos()["chelsea"].astype(int)
    back = Image.open(io.BytesIO(prepare_image(bad_inputs["cmyk.JPEG"]).jpg))
    import numpy as np

    assert np.abs(np.asarray(back).astype(int) - cat).mean() < 12  # not inverted, not garbage


@pytest.mark.parametrize("validate", ["scaled", "full"])
@pytest.mark.parametrize("name", sorted(EXPECTED_BAD))
def test_bad_inputs_are_rejected_with_a_reason(bad_inputs, name, validate):
    with pytest.raises(BadImage) as err:
        prepare_image(bad_inputs[name], validate=validate)
    assert str(err.value)


def test_reasons_say_what_is_wrong(bad_inputs):
    reasons = {}
    for name in EXPECTED_BAD:
        try:
            prepare_image(bad_inputs[name])
        except BadImage as e:
            reasons[name] = str(e)
    assert reasons["empty.JPEG"] == "empty file"
    assert "not an image" in reasons["not_an_image.JPEG"]
    assert "Premature end" in reasons["truncated.JPEG"]
    assert "corrupt JPEG" in reasons["garbage_after_header.JPEG"]


def test_resize_shorter_downscales_only_larger_images():
    astronaut = jpeg(Image.fromarray(photos()["astronaut"]))  # 512x512
    coffee = jpeg(Image.fromarray(photos()["coffee"]))  # 600x400
    small = prepare_image(astronaut, resize_shorter=600)
    assert small.jpg == astronaut and small.converted is None
    img = prepare_image(astronaut, resize_shorter=256, quality=80)
    assert (img.width, img.height) == (256, 256) and "resized" in img.converted
    assert Image.open(io.BytesIO(img.jpg)).size == (256, 256)
    wide = prepare_image(coffee, resize_shorter=200)
    assert (wide.width, wide.height) == (300, 200)


def test_resize_applies_to_converted_inputs_too(bad_inputs):
    img = prepare_image(bad_inputs["png_named.JPEG"], resize_shorter=100)
    assert min(img.width, img.height) == 100 and "resized" in img.converted
    assert Image.open(io.BytesIO(img.jpg)).mode == "RGB"
