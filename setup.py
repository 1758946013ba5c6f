"""medir-fast: fast inference for AMIR, the all-in-one medical image restoration network."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

# The streaming runtime's Python binding; the C++ library, its tests and the AOTInductor
# example host are built by csrc/CMakeLists.txt.
runtime = Pybind11Extension(
    "medir_fast._runtime",
    ["csrc/src/runtime.cpp", "csrc/python/bindings.cpp"],
    include_dirs=["csrc/include"],
    cxx_std=17,
)

setup(
    name="medir-fast",
    version="0.1.0",
    description="Fast inference for AMIR (all-in-one medical image restoration via task-adaptive routing)",
    python_requires=">=3.10",
    packages=find_packages(include=["medir_fast", "medir_fast.*"]),
    package_data={"medir_fast.weights": ["*.json", "*.safetensors", "*.pth"]},
    install_requires=[
        "torch>=2.4",  # the CPU 2.13.0 wheel: install it first (see README), pip then keeps it
        "numpy>=1.24",
        "nibabel>=5.0",
        "tqdm>=4.60",
        "pillow>=9.0",  # also decodes the JPEG 2000 CT slice of the other-volume test set
        "pydicom>=3.0",  # DICOM series in and out; the other patients' CT slices in the other-volume test set
        # DICOM's compressed transfer syntaxes, through pydicom's decoders: GDCM (BSD) for JPEG lossless and
        # lossy, JPEG-LS and JPEG 2000; pylibjpeg with OpenJPEG (MIT) for High-Throughput JPEG 2000
        "python-gdcm>=3.0.24",
        "pylibjpeg>=2.0",
        "pylibjpeg-openjpeg>=2.3",
        "scipy>=1.10",  # PET simulation and the Gaussian baseline
        "onnx>=1.17",  # ONNX engines (export --format onnx, the onnxruntime backend)
        "onnxscript>=0.5",  # what PyTorch's ONNX exporter translates with
        "onnxruntime>=1.20",  # the onnxruntime backend (its CPU provider; onnxruntime-gpu in its place adds CUDA)
    ],
    extras_require={
        # pydicom-data: pydicom's larger test files (enhanced multi-frame CT, JPEG 2000 CT) for the DICOM tests;
        # pynrrd: the workbench's body CT stored as NRRD
        "dev": ["pytest>=8", "pytest-benchmark>=4", "triton==3.9.0", "bm3d>=4.0", "scikit-image>=0.22", "matplotlib>=3.7",
                "pydicom-data>=1.0", "pynrrd>=1.0"],
        # medir-fast bench: the BM3D baseline (its noise level from scikit-image) and --plot
        "bench": ["bm3d>=4.0", "scikit-image>=0.22", "matplotlib>=3.7"],
        # ONNX Runtime's CUDA provider; it holds the same module as onnxruntime (see README)
        "gpu": ["onnxruntime-gpu>=1.20"],
        "tensorrt": ["tensorrt>=10"],  # the tensorrt backend and --format tensorrt (NVIDIA GPUs)
    },
    ext_modules=[runtime],
    cmdclass={"build_ext": build_ext},
    entry_points={"console_scripts": ["medir-fast=medir_fast.cli:main"]},
)
