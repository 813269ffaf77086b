"""The ops: torch.ops.fastdistil.* and their Python API, one module per op (triple_loss,
fused_linear_triple_loss, attention), with the unfused reference they are tested against, the input checks
they share and the loading of the C++ extension that defines them. Below this layer sit only the C++ kernels
(csrc/) and the Triton kernels (fastdistil.kernels); nothing here imports the training recipe or evaluation."""
