"""JPEG decode, crop, resize and normalise on the training device (data.decode_on_device), DALI-style.

Letters in names: B batch, C channels, H/W image side, P samples that travel as pixels.

A DataLoader worker only reads each sample's bytes, the image size from its JPEG header and the sample's
random draws (the crop box and the flip, from the same seeded generator and in the same order as the CPU
transform, so a seed gives the same crop either way); the batch travels as the JPEG bytes plus one row of
integers per sample. The training process then decodes the whole batch in one torchvision.io.decode_jpeg call
on its device (nvJPEG on CUDA, libjpeg-turbo on a CPU), and crops, resamples (antialiased, in float32, rounded
to whole grey levels as the CPU path's uint8 kernels leave them), flips and normalises there.

Where each sample is handled:
- the worker: bytes that do not pass a cheap header check (not a JPEG, a JPEG the device decoders may not
  read: arithmetic-coded, 12-bit, CMYK, RGB-coded, or cut off before its end marker) take the CPU path as
  before: decoded and cropped in the worker, they travel as uint8 pixels, and if that fails they are skipped
  and counted as bad_image exactly as without this option;
- the device: the batch is decoded in one call; if that call fails, each image is decoded alone on the device,
  then with PIL on the host; an image no decoder reads (its header was fine, its data is not) can no longer be
  skipped, since its batch and its position are fixed, so it trains as a blank (mean-colour) image and is
  counted as undecodable_on_device.
Nothing here draws random numbers, so a run with this option is as reproducible as one without.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from contrastive.transforms import FastTransform, decode_image

# One row per sample of a JpegBatch: where its bytes lie in `data`, the stored image's size, the crop box and
# the flip drawn for it, and its row in `pixels_PCHW` (-1: it travels as JPEG bytes).
_START, _END, _HEIGHT, _WIDTH, _TOP, _LEFT, _CROP_H, _CROP_W, _FLIP, _PIXEL_ROW = range(10)
_NUM_COLUMNS = 10

# Huffman-coded frames nvJPEG and libjpeg-turbo both decode: baseline, extended sequential, progressive.
_DEVICE_FRAMES = (0xC0, 0xC1, 0xC2)
# Every other start-of-frame marker (lossless, hierarchical, arithmetic-coded): decoded in the worker.
_OTHER_FRAMES = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG the device can decode, read from its header without decoding; None for any
    other bytes: not a JPEG, a frame type or colour coding left to the CPU decoder, or data that stops before
    the end-of-image marker (a cut-off file). The entropy-coded data is not checked: that takes a decode."""
    if data[:2] != b"\xff\xd8":
        return None
    size, pos, end = None, 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM and RSTn carry no segment
            pos += 2
            continue
        if marker in (0xD8, 0xD9):  # a second start of image, or the end before any scan
            return None
        length = data[pos + 2] << 8 | data[pos + 3]
        segment_end = pos + 2 + length
        if length < 2 or segment_end > end:
            return None
        if marker == 0xDA:  # start of scan: the header is complete
            # 0xFFD9 cannot occur inside entropy-coded data (0xFF is stuffed there), so its absence after
            # the first scan's header means the file was cut off.
            return size if size is not None and data.rfind(b"\xff\xd9", segment_end) >= 0 else None
        if marker in _DEVICE_FRAMES or marker in _OTHER_FRAMES:
            if size is not None or marker in _OTHER_FRAMES or length < 8:
                return None
            precision, components = data[pos + 4], data[pos + 9]
            height, width = data[pos + 5] << 8 | data[pos + 6], data[pos + 7] << 8 | data[pos + 8]
            if precision != 8 or components not in (1, 3) or not height or not width or length != 8 + 3 * components:
                return None
            # Component ids 'R', 'G', 'B' mark RGB-coded data, which libjpeg reads as such and nvJPEG as YCbCr.
            if components == 3 and bytes(data[pos + 10:pos + 19:3]) == b"RGB":
                return None
            size = (height, width)
        elif marker == 0xEE and length >= 14 and data[pos + 4:pos + 9] == b"Adobe" and data[pos + 15] == 0:
            return None  # Adobe transform 0: RGB (or CMYK) data, no YCbCr conversion: as above
        pos = segment_end
    return None


@dataclass
class JpegCrop:
    """One sample bound for the device: its JPEG bytes, stored size, crop box (top, left, crop_h, crop_w)
    and flip."""
    data: bytes
    size_hw: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool


class JpegDraws:
    """The worker's side of data.decode_on_device, in place of the CPU transform: (image bytes, out=None) ->
    a JpegCrop, drawn as `fast` draws (FastTransform.draw on the size in the JPEG header), or for bytes the
    header check leaves to the CPU (see jpeg_size) the uint8 RGBX pixels `fast` makes of them in the worker."""

    def __init__(self, fast: FastTransform):
        assert fast.kind == "crop" and fast.uint8, "the device path takes a uint8 RandomResizedCrop transform"
        self.fast = fast

    def __call__(self, data: bytes, out: torch.Tensor | None = None) -> JpegCrop | torch.Tensor:
        size_hw = jpeg_size(data)
        if size_hw is None:
            return self.fast(data, out=out)
        box, flip = self.fast.draw(height=size_hw[0], width=size_hw[1])
        return JpegCrop(data=data, size_hw=size_hw, box=box, flip=flip)


@dataclass
class JpegBatch:
    """A batch as the workers hand it over with data.decode_on_device: every sample's JPEG bytes in one flat
    uint8 tensor `data`, one int64 row per sample in `rows_B` (see the column names above), and the pixels of
    the samples decoded in the worker as uint8 RGBX (P, 4, H, W) in channels-last memory."""
    data: torch.Tensor
    rows_B: torch.Tensor
    pixels_PCHW: torch.Tensor

    def __len__(self) -> int:
        return self.rows_B.shape[0]

    def pin_memory(self) -> "JpegBatch":
        """The batch with its worker-decoded pixels in pinned memory (DataLoader(pin_memory=True) calls this on a
        GPU), so that their copy to the device does not make the host wait; the JPEG bytes and rows are read on
        the host, where pinning would only cost a copy. Runs on CUDA only: covered by bench/gpu_check.py."""
        return JpegBatch(data=self.data, rows_B=self.rows_B, pixels_PCHW=self.pixels_PCHW.pin_memory())


def handover_empty(shape: tuple[int, ...], dtype: torch.dtype, *, shared: bool) -> torch.Tensor:
    """An empty tensor, in shared memory if `shared` (in a DataLoader worker, so that handing it to the training
    process copies nothing, as DataLoader's collate does)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    return proto.new(proto._typed_storage()._new_shared(math.prod(shape))).resize_(shape)


class JpegBatchBuilder:
    """Collects a batch's samples (JpegCrop or RGBX pixels, in order) and packs them into a JpegBatch."""

    def __init__(self, *, shared: bool):
        self.shared = shared
        self.samples: list[JpegCrop | torch.Tensor] = []

    def slot(self, index: int) -> None:
        return None  # samples are packed at the end: nothing is written in place

    def put(self, index: int, sample: JpegCrop | torch.Tensor) -> None:
        assert index == len(self.samples)
        self.samples.append(sample)

    def finish(self) -> JpegBatch:
        import numpy as np

        crops = [s for s in self.samples if isinstance(s, JpegCrop)]
        pixels = [s for s in self.samples if not isinstance(s, JpegCrop)]
        data = handover_empty((sum(len(c.data) for c in crops),), torch.uint8, shared=self.shared)
        data_view = data.numpy()
        shape = (len(pixels), *pixels[0].shape[1:], pixels[0].shape[0]) if pixels else (0, 1, 1, 4)
        pixels_PHWC = handover_empty(shape, torch.uint8, shared=self.shared)
        rows = []
        start = num_pixels = 0
        for sample in self.samples:
            if isinstance(sample, JpegCrop):
                end = start + len(sample.data)
                data_view[start:end] = np.frombuffer(sample.data, dtype=np.uint8)
                rows.append([start, end, *sample.size_hw, *sample.box, int(sample.flip), -1])
                start = end
            else:
                pixels_PHWC[num_pixels].copy_(sample.permute(1, 2, 0))
                rows.append([0, 0, *sample.shape[1:], 0, 0, *sample.shape[1:], 0, num_pixels])
                num_pixels += 1
        rows_B = handover_empty((len(rows), _NUM_COLUMNS), torch.int64, shared=self.shared)
        rows_B.copy_(torch.tensor(rows, dtype=torch.int64))
        return JpegBatch(data=data, rows_B=rows_B, pixels_PCHW=pixels_PHWC.permute(0, 3, 1, 2))


def _decode_jpeg(inputs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which this project does not
    # depend on; decode_jpeg and its batched nvJPEG path are still there and tested.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device)


def _decode_one(data: torch.Tensor, size_hw: tuple[int, int], device: torch.device) -> torch.Tensor | None:
    """One image as (3, H, W) uint8 on `device`: the device's decoder, else PIL's on the host (nvJPEG
    refuses some chroma layouts libjpeg reads), else None."""
    try:
        image = _decode_jpeg([data], device)[0]
        if tuple(image.shape[1:]) == size_hw:
            return image
    except RuntimeError:
        pass
    import numpy as np

    try:
        pixels_HWC = np.asarray(decode_image(data.numpy().tobytes()))
    except Exception:
        return None
    if pixels_HWC.shape[:2] != size_hw:
        return None
    return torch.from_numpy(pixels_HWC.copy()).permute(2, 0, 1).to(device)


def decode_batch(batch: JpegBatch, *, fast: FastTransform, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """(normalised (B, 3, H, W) images on `device` in `dtype`, the number of images no decoder could read).

    Per sample: the crop box of the stored image, resampled to fast.size_hw with fast.mode and antialiasing
    (as FastTransform does on the CPU, but in float32, then rounded to whole grey levels as its uint8 kernels
    leave them), flipped if drawn, normalised with fast.normalize. Nothing here reads the device from the host."""
    import torch.nn.functional as F

    device = torch.device(device)
    rows = batch.rows_B.tolist()  # host memory: no device sync
    jpeg_rows = [i for i, row in enumerate(rows) if row[_PIXEL_ROW] < 0]
    inputs = [batch.data[rows[i][_START]:rows[i][_END]] for i in jpeg_rows]
    images_BCHW = torch.empty((len(rows), 3, *fast.size_hw), dtype=torch.float32, device=device)
    decoded: list[torch.Tensor | None] = []
    if inputs:
        try:
            decoded = _decode_jpeg(inputs, device)
            if any(tuple(img.shape[1:]) != (rows[i][_HEIGHT], rows[i][_WIDTH]) for i, img in zip(jpeg_rows, decoded)):
                raise RuntimeError("a decoded image's size differs from its header's")
        except RuntimeError:  # the batched call does not say which image failed: decode each alone
            decoded = [_decode_one(data, (rows[i][_HEIGHT], rows[i][_WIDTH]), device)
                       for i, data in zip(jpeg_rows, inputs)]
    undecodable = []
    # One resample per image: the crops differ in size, and an antialiased resize has no batched form for that.
    for i, image_CHW in zip(jpeg_rows, decoded):
        if image_CHW is None:
            undecodable.append(i)
            continue
        row = rows[i]
        top, left, crop_h, crop_w = row[_TOP], row[_LEFT], row[_CROP_H], row[_CROP_W]
        crop_1CHW = image_CHW[None, :, top:top + crop_h, left:left + crop_w].to(torch.float32)
        resized_1CHW = F.interpolate(crop_1CHW, size=fast.size_hw, mode=fast.mode, antialias=True)
        images_BCHW[i].copy_(resized_1CHW[0].flip(-1) if row[_FLIP] else resized_1CHW[0])
    # Whole grey levels, as the CPU path's uint8 resampling leaves them (bicubic overshoots past 0 and 255).
    images_BCHW.round_().clamp_(0, 255)
    pixel_rows = [i for i, row in enumerate(rows) if row[_PIXEL_ROW] >= 0]
    if pixel_rows:
        pixels_PCHW = batch.pixels_PCHW.to(device, non_blocking=True)[:, :3]
        for i in pixel_rows:
            images_BCHW[i].copy_(pixels_PCHW[rows[i][_PIXEL_ROW]])
    mean_C11, inv_std_C11 = fast.normalize.constants_on(device)
    images_BCHW.sub_(mean_C11).mul_(inv_std_C11)
    for i in undecodable:
        images_BCHW[i].zero_()  # the mean colour, after normalising
    return images_BCHW.to(dtype), len(undecodable)
