"""rkbench: sweep YOLO export / quantization / runtime options for Rockchip NPUs and compare them."""

__version__ = "0.1.0"
