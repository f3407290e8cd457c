"""ONNX Runtime's MatMulNBits (4-bit weights, one-node graph) as a peer for bench_linear.py:
the strongest CPU kernel for low-bit weights we know of. Optional: needs `pip install
onnxruntime onnx`; make_int4_matmul returns None without them.

Our INT4 g128 (symmetric) weight maps onto MatMulNBits' layout without requantizing: B is
[N, K / 128, 64] bytes with value k in byte k // 2, low nibble first, as ours; MatMulNBits codes
are unsigned with an implied zero point of 8, ours two's complement, so each nibble is XORed
with 8. accuracy_level 0 computes in fp32, 4 quantizes the activations to int8 per block."""
from typing import Callable, Optional

import numpy as np
import torch


def make_int4_matmul(qweight: torch.Tensor, scales: torch.Tensor, K: int, N: int, accuracy_level: int,
                     threads: int) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """x [M, K] float32 numpy -> x @ W^T for our int4 g128 (qweight [N, K/2] uint8, scales
    [N, K/128] fp32), run by onnxruntime; None when onnxruntime / onnx are not installed."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    return make_int4_chain([(qweight, scales)], K, accuracy_level, threads)


def make_int4_chain(layers, K: int, accuracy_level: int,
                    threads: int) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """As make_int4_matmul for K x K layers [(qweight, scales), ...] applied in turn (one
    session, one thread pool: a model's decoding step through its layers); None without
    onnxruntime / onnx."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    block = 128
    nodes, inits = [], []
    for i, (qweight, scales) in enumerate(layers):
        N = qweight.shape[0]
        b = (qweight.numpy() ^ 0x88).reshape(N, K // block, block // 2)
        src, dst = ("A" if i == 0 else f"h{i}"), ("Y" if i == len(layers) - 1 else f"h{i + 1}")
        nodes.append(helper.make_node("MatMulNBits", [src, f"B{i}", f"scales{i}"], [dst], domain="com.microsoft",
                                      K=K, N=N, bits=4, block_size=block, accuracy_level=accuracy_level))
        inits += [numpy_helper.from_array(b, f"B{i}"),
                  numpy_helper.from_array(scales.numpy().reshape(-1).astype(np.float32), f"scales{i}")]
    N = layers[-1][0].shape[0]
    graph = helper.make_graph(
        nodes, "int4_matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Its pool's threads would spin after each run, taking the two cores from whatever the
    # benchmark's interleaved rounds time next: ours at 1 row then ran 0.56-0.75 ms per layer
    # (bench_w4a8_decode) instead of 0.35-0.47, while ORT's own times moved within noise.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["Y"], {"A": x})[0]
