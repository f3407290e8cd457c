# Sourced by tests/sanitize/run.sh and tests/avx2_vnni_pass.sh: the pytest files that call
# the C++ kernels (every format, ISA-exactness, views, huge values, calibration solvers).
KERNEL_PYTEST_FILES=(
  tests/python/test_ops.py tests/python/test_weight_only.py tests/python/test_w8a8.py
  tests/python/test_lowbit_linear.py tests/python/test_formats_lowbit.py tests/python/test_binary.py
  tests/python/test_w4a8.py tests/python/test_isa_exact.py tests/python/test_views_lifetime.py
  tests/python/test_huge_values.py tests/python/test_gptq.py tests/python/test_awq.py
  tests/python/test_distill_kd.py
  tests/python/test_sparse_ops.py tests/python/test_sparsegpt.py tests/python/test_int8_conv.py
  tests/python/test_conv_epilogue.py tests/python/test_torch_onednn_route.py
  tests/python/test_distill_features_native.py tests/python/test_quantized_embedding.py
  tests/python/test_decode_gemm.py
)
