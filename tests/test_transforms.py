"""The fast transform's pieces against torchvision and PIL: crop draws, pixel copies, and end to end."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from contrastive.transforms import random_resized_crop_params, rgbx_pixels


@pytest.mark.parametrize("height,width,scale,ratio,falls_back", [
    (256, 256, (0.9, 1.0), (3 / 4, 4 / 3), True),   # open_clip's train crop on square shards: ~5 tries, 14% fallback
    (256, 256, (0.08, 1.0), (3 / 4, 4 / 3), False),  # torchvision's default
    (80, 100, (0.9, 1.0), (3 / 4, 4 / 3), True),
    (60, 200, (0.95, 1.0), (3 / 4, 4 / 3), True),   # wider than the ratio allows
    (300, 40, (0.5, 0.999), (0.5, 2.0), True),    # taller than any crop: always the fallback
    (3, 2, (0.9, 1.0), (1.0, 1.0), False),
])
def test_crop_params_are_get_params_draw_for_draw(height, width, scale, ratio, falls_back):
    img = Image.new("RGB", (width, height))
    fallbacks = 0
    for seed in range(300):
        torch.manual_seed(seed)
        torch.rand(seed % 3)  # also from a generator that is not freshly seeded
        want = T.RandomResizedCrop.get_params(img, list(scale), list(ratio))
        after = torch.get_rng_state()
        want_next = torch.rand(5)
        torch.manual_seed(seed)
        torch.rand(seed % 3)
        got = random_resized_crop_params(height=height, width=width, scale=scale, ratio=ratio)
        assert got == want, seed
        assert torch.equal(torch.rand(5), want_next), seed  # the generator is left where get_params leaves it
        torch.manual_seed(seed)
        torch.rand(seed % 3)
        torch.empty(20).uniform_()  # ten failed tries, no randint
        fallbacks += torch.equal(torch.get_rng_state(), after)
    assert (fallbacks > 0) == falls_back  # both paths are covered


def test_rgbx_pixels_are_the_rgb_pixels_in_channels_last_memory():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    x = rgbx_pixels(Image.fromarray(rgb))
    assert x.shape == (1, 4, 7, 5) and x.dtype == torch.uint8
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(x[0, :3].permute(1, 2, 0).numpy(), rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).resize((64, 48)).save(buf, format="JPEG", quality=90)
    jpeg = Image.open(io.BytesIO(buf.getvalue()))
    assert np.array_equal(rgbx_pixels(jpeg)[0, :3].permute(1, 2, 0).numpy(), np.asarray(jpeg))


def test_four_channel_resampling_equals_three_channel():
    """The padding channel changes nothing: torch's uint8 kernels resample each channel on its own."""
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(61, 67, 3), dtype=np.uint8))
    x4 = rgbx_pixels(img)[..., 3:58, 2:60].contiguous(memory_format=torch.channels_last)
    x3 = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)[..., 3:58, 2:60]
    for mode in ("bicubic", "bilinear"):
        got = F.interpolate(x4, size=(32, 32), mode=mode, antialias=True)[:, :3]
        want = F.interpolate(x3, size=(32, 32), mode=mode, antialias=True)
        assert torch.equal(got, want)


def test_uint8_output_then_normalize_batch_is_the_float_output_bit_for_bit():
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from contrastive.transforms import fast_preprocess

    rng = np.random.default_rng(2)
    datas = []
    for side in (70, 90):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(side, side + 7, 3), dtype=np.uint8)).save(buf, format="JPEG")
        datas.append(buf.getvalue())
    for is_train in (True, False):
        fast = fast_preprocess(image_transform_v2(PreprocessCfg(size=64), is_train=is_train))
        pixels = fast.as_uint8()
        # RGBX pixels in channels-last memory, as the loader's batches hold them
        want, got = [], torch.empty(len(datas), 64, 64, 4, dtype=torch.uint8).permute(0, 3, 1, 2)
        for k, data in enumerate(datas):
            torch.manual_seed(k)
            want.append(fast(data))
            torch.manual_seed(k)
            alone = pixels(data)
            assert alone.shape == (4, 64, 64) and alone.permute(1, 2, 0).is_contiguous()
            torch.manual_seed(k)
            pixels(data, out=got[k])
            assert torch.equal(got[k], alone)
        floats = fast.normalize.normalize_batch(got)
        assert floats.is_contiguous() and torch.equal(floats, torch.stack(want))
