"""The compiled loader extension (C++17, plus CUDA when built with nvcc).

Import `cuda_ext._C` for the raw functions; `sllm_knative.loading` is the Python API.
"""
