"""Shared pytest fixtures for the segmentation tests: the toy ADE20K in a temporary root."""

import os

import pytest

from convmae_det.data.datasets.ade20k import register_toy_ade20k

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CFG = os.path.join(ROOT, "configs", "ADE20K", "upernet_convmae_toy.yaml")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    """Registers ``toy_ade20k_sem_seg_{train,val}`` under a fresh root (generated on first use)
    and exports it as ``DETECTRON2_DATASETS`` for subprocesses; restores both afterwards."""
    root = str(tmp_path_factory.mktemp("d2_datasets"))
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = root
    register_toy_ade20k(root)
    yield root
    if old is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = old
    register_toy_ade20k(old or "datasets")
