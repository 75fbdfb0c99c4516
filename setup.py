"""convmae_det: ConvMAE-family backbones from pretraining to Detectron2 detection and segmentation."""

from setuptools import find_packages, setup

setup(
    name="convmae_det",
    version="0.1.0",
    description=(
        "ConvMAE / FastConvMAE pretraining and ConvViT backbones for Mask R-CNN (COCO) and "
        "UperNet (ADE20K) on Detectron2"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["convmae_det", "convmae_det.*"]),
    # torch, torchvision and detectron2 are installed by `make install` (see README): their right
    # build depends on the machine (CPU / CUDA version) and detectron2 is not on PyPI by name.
    install_requires=[
        "timm",
        "fvcore",
        "iopath",
        "omegaconf>=2.1",
        "pycocotools>=2.0.2",
        "faster-coco-eval>=1.6",
        "opencv-python-headless",
        "matplotlib",
    ],
    extras_require={
        "deploy": ["onnx>=1.16", "onnxruntime>=1.18"],
        "test": ["pytest", "hypothesis", "import-linter>=2.17,<3"],
    },
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
