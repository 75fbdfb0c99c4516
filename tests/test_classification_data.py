"""ImageNet-style classification data: folder loading and its errors, registration under
$DETECTRON2_DATASETS, the generated toy set, the mapper and the official transforms."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

import convmae_det.data  # noqa: F401  (registers the datasets)
from convmae_det.data.classification_mapper import (
    ClassificationMapper,
    ImageReadError,
    build_classification_transform,
)
from convmae_det.data.datasets.imagenet import (
    IMAGE_EXTENSIONS,
    load_image_folder,
    register_image_folder_dataset,
    register_imagenet,
)
from convmae_det.data.datasets.toy_coco import TOY_CLASSES
from convmae_det.data.datasets.toy_imagenet import (
    TOY_IMAGENET_SPLITS,
    ensure_toy_imagenet,
    register_toy_imagenet,
)
from convmae_det.data.resumable_loader import BadSampleError, ResumableTrainLoader
from convmae_det.engine.config import check_datasets
from convmae_det.utils.seeding import fork_rng

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def _touch(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _digest(root: str) -> str:
    """Hash of every file below ``root`` (names and contents), the lock file excepted."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            if name == ".lock":
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                h.update(os.path.relpath(path, root).encode() + f.read())
    return h.hexdigest()


@pytest.fixture
def restore_registrations():
    """Tests re-register the datasets under temporary roots; put the originals back."""
    imagenet_root = MetadataCatalog.get("imagenet_train").dataset_root
    toy_root = MetadataCatalog.get("toy_imagenet_train").dataset_root
    yield
    register_imagenet(imagenet_root)
    register_toy_imagenet(root=toy_root)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> str:
    return ensure_toy_imagenet(str(tmp_path_factory.mktemp("toy_imagenet")))


# ------------------------------------------------------------------------------ folders
def test_load_image_folder_labels_sorting_and_ignored_files(tmp_path):
    split = tmp_path / "train"
    for rel in ["b/x2.PNG", "b/x1.jpeg", "a/img_2.JPEG", "a/img_1.jpg", "a/sub/img_0.webp",
                "c/z.Tiff", "a/notes.txt", "a/.hidden.JPEG", "c/archive.tar"]:  # fmt: skip
        _touch(split / rel)
    (split / ".ipynb_checkpoints").mkdir()
    (split / "README").write_text("not a class folder")

    records = load_image_folder(str(split))

    assert [(r["class_name"], os.path.relpath(r["file_name"], split)) for r in records] == [
        ("a", "a/img_1.jpg"),
        ("a", "a/img_2.JPEG"),
        ("a", "a/sub/img_0.webp"),
        ("b", "b/x1.jpeg"),
        ("b", "b/x2.PNG"),
        ("c", "c/z.Tiff"),
    ]
    assert [r["label"] for r in records] == [0, 0, 0, 1, 1, 2]
    assert [r["image_id"] for r in records] == list(range(6))
    assert all(os.path.isabs(r["file_name"]) for r in records)
    assert set(records[0]) == {"file_name", "image_id", "label", "class_name"}

    # an explicit class list sets the label order
    given = load_image_folder(str(split), classes=["c", "a", "b"])
    assert [(r["class_name"], r["label"]) for r in given] == [("c", 0)] + [("a", 1)] * 3 + [
        ("b", 2)
    ] * 2


def test_image_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert set(IMAGE_EXTENSIONS) == set(IMG_EXTENSIONS)


def test_missing_split_folder_is_named(tmp_path):
    missing = tmp_path / "imagenet" / "train"
    with pytest.raises(FileNotFoundError) as info:
        load_image_folder(str(missing))
    assert str(missing) in str(info.value)
    assert f"{missing}/<class>/*.JPEG" in str(info.value)


def test_split_without_class_folders_is_an_error(tmp_path):
    split = tmp_path / "train"
    _touch(split / "loose.JPEG")  # images directly in the split folder, no class folders
    with pytest.raises(ValueError, match="no class folders") as info:
        load_image_folder(str(split))
    assert f"{split}/<class>/*.JPEG" in str(info.value)


def test_empty_class_folder_is_named(tmp_path):
    split = tmp_path / "train"
    _touch(split / "n01" / "a.JPEG")
    _touch(split / "n02" / "labels.txt")  # no image in it
    (split / "n03").mkdir()
    with pytest.raises(ValueError) as info:
        load_image_folder(str(split))
    message = str(info.value)
    assert str(split / "n02") in message and str(split / "n03") in message
    assert str(split / "n01") not in message
    assert "<class>/*.JPEG" in message


def test_class_list_mismatch_names_missing_and_extra_folders(tmp_path):
    split = tmp_path / "val"
    for name in ("a", "b", "x"):
        _touch(split / name / "1.JPEG")
    with pytest.raises(ValueError) as info:
        load_image_folder(str(split), classes=["a", "b", "c"])
    message = str(info.value)
    assert "missing folders: c" in message and "unexpected folders: x" in message
    assert str(split) in message


# ------------------------------------------------------------------------------ registration
def test_imagenet_is_registered_under_the_env_root(tmp_path, monkeypatch, restore_registrations):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    root = tmp_path / "imagenet"
    for split, classes in (("train", ("n02", "n01", "n03")), ("val", ("n01", "n02", "n03"))):
        for name in classes:
            _touch(root / split / name / f"{split}_{name}.JPEG")

    register_imagenet()  # reads $DETECTRON2_DATASETS now, as on import

    for split in ("train", "val"):
        meta = MetadataCatalog.get(f"imagenet_{split}")
        assert meta.image_root == str(root / split)
        assert meta.dataset_root == str(root)
        assert meta.evaluator_type == "classification"
        assert meta.get("classes") is None  # known after the first load
    train = DatasetCatalog.get("imagenet_train")
    val = DatasetCatalog.get("imagenet_val")
    assert [(r["class_name"], r["label"]) for r in train] == [("n01", 0), ("n02", 1), ("n03", 2)]
    assert [(r["class_name"], r["label"]) for r in val] == [("n01", 0), ("n02", 1), ("n03", 2)]
    assert MetadataCatalog.get("imagenet_train").classes == ["n01", "n02", "n03"]
    assert MetadataCatalog.get("imagenet_val").classes == ["n01", "n02", "n03"]


def test_val_must_have_the_class_folders_of_train(tmp_path, monkeypatch, restore_registrations):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    root = tmp_path / "imagenet"
    for name in ("n01", "n02"):
        _touch(root / "train" / name / "t.JPEG")
    for name in ("n01", "n09"):
        _touch(root / "val" / name / "v.JPEG")
    register_imagenet()
    with pytest.raises(ValueError) as info:
        DatasetCatalog.get("imagenet_val")
    message = str(info.value)
    assert "imagenet_val" in message
    assert "missing folders: n02" in message and "unexpected folders: n09" in message
    assert str(root / "val") in message and str(root / "train") in message


def test_generic_registration_with_a_given_class_list(tmp_path, restore_registrations):
    for name in ("cat", "dog"):
        _touch(tmp_path / "data" / "test" / name / "1.png")
    name = "test_image_folder_given_classes"
    try:
        register_image_folder_dataset(name, str(tmp_path / "data"), "test", classes=["dog", "cat"])
        assert MetadataCatalog.get(name).classes == ["dog", "cat"]
        assert [(r["class_name"], r["label"]) for r in DatasetCatalog.get(name)] == [
            ("dog", 0),
            ("cat", 1),
        ]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_check_datasets_names_a_missing_imagenet_folder(
    tmp_path, monkeypatch, restore_registrations
):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    register_imagenet()
    with pytest.raises(FileNotFoundError) as info:
        check_datasets([("imagenet_val", "dataloader.test.dataset.names")])
    message = str(info.value)
    assert "imagenet_val" in message and "dataloader.test.dataset.names" in message
    assert str(tmp_path / "imagenet" / "val") in message
    # the loader names the folder too, with the expected layout
    with pytest.raises(FileNotFoundError, match=r"<class>/\*\.JPEG"):
        DatasetCatalog.get("imagenet_train")


# ------------------------------------------------------------------------------ toy set
def test_toy_set_counts_sizes_and_classes(toy_root):
    for split, per_class, _ in TOY_IMAGENET_SPLITS.values():
        assert sorted(os.listdir(os.path.join(toy_root, split))) == sorted(TOY_CLASSES)
        records = load_image_folder(os.path.join(toy_root, split), classes=TOY_CLASSES)
        counts = np.bincount([r["label"] for r in records], minlength=len(TOY_CLASSES))
        assert counts.tolist() == [per_class] * len(TOY_CLASSES)
    assert [n for n in os.listdir(toy_root) if n.startswith(".toy_imagenet-")] == []
    for name in TOY_CLASSES:
        with Image.open(os.path.join(toy_root, "val", name, f"{name}_0000.png")) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    # one shape on a textured background: neither flat nor identical across images
    a = np.asarray(Image.open(os.path.join(toy_root, "train", "star", "star_0000.png")))
    b = np.asarray(Image.open(os.path.join(toy_root, "train", "star", "star_0001.png")))
    assert a.std() > 5 and not np.array_equal(a, b)


def test_toy_set_is_deterministic_and_regenerated_when_stale(toy_root, tmp_path):
    other = ensure_toy_imagenet(str(tmp_path / "again"))
    reference = _digest(toy_root)
    assert _digest(other) == reference

    # a stale marker (older format): generated again, same content
    marker = os.path.join(other, "toy_imagenet.json")
    with open(marker) as f:
        content = json.load(f)
    content["format_version"] = 0
    with open(marker, "w") as f:
        json.dump(content, f)
    victim = os.path.join(other, "train", "cross", "cross_0007.png")
    with open(victim, "wb") as f:
        f.write(b"corrupt")
    assert ensure_toy_imagenet(other) == other
    assert _digest(other) == reference

    # a partial set (an image missing) is generated again too
    os.remove(os.path.join(other, "val", "circle", "circle_0003.png"))
    ensure_toy_imagenet(other)
    assert _digest(other) == reference


def test_toy_datasets_are_registered_and_generated_on_first_use(
    tmp_path, monkeypatch, restore_registrations
):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    register_toy_imagenet()
    meta = MetadataCatalog.get("toy_imagenet_train")
    assert meta.image_root == str(tmp_path / "toy_imagenet" / "train")
    assert meta.evaluator_type == "classification" and meta.generated_on_first_use
    assert meta.classes == list(TOY_CLASSES)
    assert not (tmp_path / "toy_imagenet").exists()  # nothing written at registration

    check_datasets([("toy_imagenet_val", "dataloader.test.dataset.names")])  # generates
    assert (tmp_path / "toy_imagenet" / "toy_imagenet.json").is_file()
    train = DatasetCatalog.get("toy_imagenet_train")
    assert len(train) == 600 and len(DatasetCatalog.get("toy_imagenet_val")) == 120
    assert all(r["file_name"].startswith(str(tmp_path / "toy_imagenet" / "train")) for r in train)
    assert train[0]["class_name"] == "circle" and train[-1]["class_name"] == "cross"


# ------------------------------------------------------------------------------ mapper
def test_mapper_output_is_a_normalised_224_tensor(toy_root):
    records = load_image_folder(os.path.join(toy_root, "val"), classes=TOY_CLASSES)
    record = records[30]  # a triangle
    mapper = ClassificationMapper(build_classification_transform(is_training=False))
    out = mapper(record)
    assert set(out) == {"image", "label", "image_id", "file_name"}
    assert out["label"] == 1 and isinstance(out["label"], int)
    assert out["image_id"] == 30 and out["file_name"] == record["file_name"]
    image = out["image"]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert bool(((image >= low - 1e-5) & (image <= high + 1e-5)).all())
    assert image.min() < 0 < image.max()
    bgr = ClassificationMapper(mapper.transform, image_format="BGR")(record)["image"]
    assert torch.equal(bgr, image.flip(0))


def test_eval_transform_resizes_the_shorter_side_to_256_and_crops_the_centre():
    # 512x384 image: resized to 341x256, centre crop 224 starts at (58, 16), i.e. at (87, 24)
    # in the original. White inside the region that the crop keeps, black well outside it.
    array = np.zeros((384, 512, 3), np.uint8)
    array[18:366, 80:432] = 255
    image = Image.fromarray(array)
    out = build_classification_transform(is_training=False)(image)
    assert out.shape == (3, 224, 224)
    pixels = out * STD + MEAN
    assert torch.allclose(pixels, torch.ones_like(pixels), atol=1 / 255)

    expected = image.resize((341, 256), Image.BICUBIC).crop((58, 16, 282, 240))
    expected = (transforms.functional.to_tensor(expected) - MEAN) / STD
    assert torch.allclose(out, expected, atol=1e-6)

    # the crop is centred: a black column at the left edge of the crop window shows up
    array[:, 80:100] = 0
    left = build_classification_transform(is_training=False)(Image.fromarray(array)) * STD + MEAN
    assert left[:, :, :3].max() < 0.5 and left[:, :, -3:].min() > 0.99

    # above 224 the official crop_pct is 1.0: resize the shorter side to the input size
    big = build_classification_transform(is_training=False, input_size=384)
    assert big.transforms[0].size == 384 and big(image).shape == (3, 384, 384)


def test_training_transforms_are_reproducible_under_a_seed(toy_root):
    image = Image.open(os.path.join(toy_root, "train", "square", "square_0000.png")).convert("RGB")
    for recipe in ("finetune", "linprobe"):
        transform = build_classification_transform(is_training=True, recipe=recipe)
        with fork_rng(5):
            a = transform(image)
        with fork_rng(5):
            b = transform(image)
        with fork_rng(6):
            c = transform(image)
        assert a.shape == (3, 224, 224)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_linprobe_has_no_randaugment_and_finetune_has():
    finetune = build_classification_transform(is_training=True, recipe="finetune")
    linprobe = build_classification_transform(is_training=True, recipe="linprobe")
    assert any(isinstance(t, RandAugment) for t in finetune.transforms)
    assert any(isinstance(t, RandomErasing) and t.probability == 0.25 for t in finetune.transforms)
    assert not any(isinstance(t, (RandAugment, RandomErasing)) for t in linprobe.transforms)
    assert [type(t) for t in linprobe.transforms] == [
        transforms.RandomResizedCrop,
        transforms.RandomHorizontalFlip,
        transforms.ToTensor,
        transforms.Normalize,
    ]
    assert linprobe.transforms[0].interpolation == transforms.InterpolationMode.BICUBIC

    # a flat colour stays that colour under crops and flips, not under RandAugment / erasing
    colour = np.array([120, 60, 200], np.uint8)
    flat = Image.fromarray(np.broadcast_to(colour, (64, 64, 3)).copy())
    expected = (torch.tensor(colour / 255.0, dtype=torch.float32).view(3, 1, 1) - MEAN) / STD
    changed = 0
    for seed in range(8):
        with fork_rng(seed):
            assert torch.allclose(linprobe(flat), expected.expand(3, 224, 224), atol=1e-5)
        with fork_rng(seed):
            changed += not torch.allclose(finetune(flat), expected.expand(3, 224, 224), atol=1e-5)
    assert changed > 0


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"recipe": "pretrain"}, "recipe='pretrain'"),
        ({"input_size": 100}, "input_size=100"),
        ({"input_size": 0}, "input_size=0"),
        ({"input_size": -32}, "input_size=-32"),
        ({"crop_pct": 1.5}, "crop_pct=1.5"),
        ({"interpolation": "cubic"}, "interpolation='cubic'"),
    ],
)
def test_bad_transform_arguments_are_named(kwargs, named):
    with pytest.raises(ValueError) as info:
        build_classification_transform(is_training=False, **kwargs)
    assert named in str(info.value)


def test_unreadable_images_are_named_and_skipped_by_the_loader(toy_root, tmp_path, caplog):
    good = load_image_folder(os.path.join(toy_root, "val"), classes=TOY_CLASSES)[:4]
    truncated = tmp_path / "truncated.png"
    data = _png_bytes(np.full((64, 64, 3), 90, np.uint8) + np.arange(64, dtype=np.uint8)[:, None])
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.JPEG"
    garbage.write_bytes(b"not an image")
    bad = [
        {"file_name": str(path), "image_id": 100 + i, "label": 0, "class_name": "circle"}
        for i, path in enumerate((truncated, garbage))
    ]
    mapper = ClassificationMapper(
        build_classification_transform(is_training=True, recipe="linprobe", input_size=32)
    )
    for record in bad:
        with pytest.raises(ImageReadError, match=os.path.basename(record["file_name"])):
            mapper(record)

    dataset = good + bad
    with pytest.raises(BadSampleError, match=r"(truncated\.png|garbage\.JPEG)"):
        for _ in ResumableTrainLoader(dataset, mapper=mapper, total_batch_size=3, seed=0):
            pass

    loader = ResumableTrainLoader(
        dataset, mapper=mapper, total_batch_size=3, seed=0, skip_bad_samples=True
    )
    batches = []
    with caplog.at_level(logging.WARNING, logger="convmae_det.data.resumable_loader"):
        for batch in loader:
            batches.append(batch)
            if len(batches) == 4:  # 12 samples: every image of both epochs
                break
    bad_names = {r["file_name"] for r in bad}
    assert all(s["file_name"] not in bad_names for b in batches for s in b)
    assert all(s["image"].shape == (3, 32, 32) for b in batches for s in b)
    assert loader.num_skipped >= 4  # each bad file once per epoch, plus bad replacements
    assert loader.state_dict()["num_skipped"] == loader.num_skipped
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert str(truncated) in logged and str(garbage) in logged
