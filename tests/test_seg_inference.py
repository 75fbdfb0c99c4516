"""Test-time modes: sliding windows, whole image, multi-scale + flip."""

import pytest
import torch
from detectron2.modeling import build_model
from seg_toy_fixtures import TOY_CFG

from convmae_det.engine.seg_train_loop import get_seg_cfg
from convmae_det.modeling.segmentor import slide_inference, sliding_window_boxes


def test_windows_follow_the_mmseg_grid_and_the_last_one_is_moved_inside():
    # ADE20K-like 512x683 image, crop 512, stride 341: two columns, the second ends at the border
    assert sliding_window_boxes(512, 683, (512, 512), (341, 341)) == [
        (0, 512, 0, 512),
        (0, 512, 171, 683),
    ]
    boxes = sliding_window_boxes(700, 1100, (512, 512), (341, 341))
    assert len(boxes) == 2 * 3
    assert all(y2 - y1 == 512 and x2 - x1 == 512 for y1, y2, x1, x2 in boxes)
    assert max(b[1] for b in boxes) == 700 and max(b[3] for b in boxes) == 1100
    # smaller than the crop: one window, clipped to the image
    assert sliding_window_boxes(100, 300, (512, 512), (341, 341)) == [(0, 100, 0, 300)]


def test_window_weights_sum_to_one_everywhere_including_borders():
    """Averaging a position-reporting 'model' returns each pixel's own value: every pixel is
    divided by exactly the number of windows that cover it."""
    h, w = 150, 230
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    image = torch.stack([yy, xx, yy * w + xx])[None]  # (1, 3, H, W)
    calls = []

    def identity(crop):
        calls.append(tuple(crop.shape[-2:]))
        return crop

    out = slide_inference(identity, image, num_classes=3, crop_size=(64, 96), stride=(43, 64))
    assert torch.allclose(out, image)
    assert len(calls) == len(sliding_window_boxes(h, w, (64, 96), (43, 64))) > 4
    count = torch.zeros(h, w)
    for y1, y2, x1, x2 in sliding_window_boxes(h, w, (64, 96), (43, 64)):
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1 and count[0, 0] == 1 and count[-1, -1] == 1 and count.max() > 1


def test_small_windows_are_zero_padded_to_the_size_divisibility_and_cropped_back():
    seen = []

    def fn(crop):
        seen.append(tuple(crop.shape[-2:]))
        return crop[:, :2]

    out = slide_inference(
        fn, torch.ones(1, 3, 40, 50), num_classes=2, crop_size=(64, 64), stride=(43, 43),
        size_divisibility=32,
    )  # fmt: skip
    assert seen == [(64, 64)] and out.shape == (1, 2, 40, 50) and torch.all(out == 1)


@pytest.fixture(scope="module")
def toy_model():
    cfg = get_seg_cfg(TOY_CFG)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # make the untrained head produce non-trivial logits
        model.sem_seg_head.conv_seg.weight.normal_(std=1.0)
    return model


def test_sliding_window_equals_whole_image_when_the_crop_covers_the_image(toy_model):
    image = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        toy_model.test_mode = "whole"
        whole = toy_model.inference(image)
        toy_model.test_mode, toy_model.crop_size, toy_model.stride = "slide", (96, 128), (64, 85)
        slide = toy_model.inference(image)
        toy_model.crop_size = (160, 160)  # larger than the image: one clipped window
        slide_big = toy_model.inference(image)
    assert whole.shape == (1, 6, 96, 128)
    assert torch.allclose(slide, whole, atol=1e-5)
    assert torch.allclose(slide_big, whole, atol=1e-5)


def test_sliding_window_output_differs_from_whole_when_windows_overlap(toy_model):
    image = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        toy_model.test_mode = "whole"
        whole = toy_model.inference(image)
        toy_model.test_mode, toy_model.crop_size, toy_model.stride = "slide", (128, 128), (85, 85)
        slide = toy_model.inference(image)
    assert slide.shape == whole.shape and not torch.allclose(slide, whole, atol=1e-3)


def test_multi_scale_flip_averages_probabilities_at_the_input_size(toy_model):
    image = torch.randn(1, 3, 96, 128)
    toy_model.test_mode = "whole"
    toy_model.scales, toy_model.flip = (0.5, 1.0, 1.5), True
    try:
        with torch.no_grad():
            probs = toy_model.inference(image)
            single = toy_model._single_scale(image).softmax(1)
            flipped = toy_model._single_scale(image.flip(-1)).flip(-1).softmax(1)
    finally:
        toy_model.scales, toy_model.flip = (1.0,), False
    assert probs.shape == (1, 6, 96, 128)
    assert torch.allclose(probs.sum(1), torch.ones(1, 96, 128), atol=1e-5)
    assert not torch.allclose(probs, (single + flipped) / 2, atol=1e-4)  # other scales count


def test_segmentor_resizes_predictions_to_the_original_image_size(toy_model):
    toy_model.test_mode, toy_model.crop_size, toy_model.stride = "slide", (128, 128), (85, 85)
    item = {
        "image": torch.randint(0, 255, (3, 128, 171), dtype=torch.uint8),
        "height": 300,
        "width": 400,
    }
    with torch.no_grad():
        out = toy_model([item])
    assert out[0]["sem_seg"].shape == (6, 300, 400)
