"""Registration: schema, fake kernel and autograd (opcheck), torch.compile, and the no-extension fallback."""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastdistil
from fastdistil import TripleLossArgs
from helpers import loss_and_grads, make_inputs, map_tensors, on_device, tensors

OPS = torch.ops.fastdistil
TEMPERATURE = 1.5


def small_args(requires_grad, alpha_mse=0.0):
    inputs = map_tensors(torch.Tensor.detach, make_inputs((2, 5), 37, dim=8, label_frac=0.3))
    inputs.student_logits.requires_grad_(requires_grad)
    inputs.student_hidden.requires_grad_(requires_grad)
    return inputs._replace(temperature=TEMPERATURE, alpha_mse=alpha_mse)


@pytest.mark.parametrize("op, requires_grad", [
    (OPS._triple_loss_forward.default, False),
    (OPS.triple_loss.default, False),
    (OPS.triple_loss.default, True),
], ids=["forward-no-grad", "public-no-grad", "public-grad"])
@pytest.mark.parametrize("alpha_mse", [0.0, 0.05], ids=["no-mse", "mse"])
def test_opcheck(op, requires_grad, alpha_mse):
    # _triple_loss_forward's autograd scales its own gradient outputs in place, so with requires_grad it is only
    # checked through the public op, which never exposes them.
    torch.library.opcheck(op, small_args(requires_grad, alpha_mse))


@pytest.mark.parametrize("alpha_mse", [0.0, 0.05], ids=["no-mse", "mse"])
def test_opcheck_out_variant(alpha_mse):
    args = small_args(False, alpha_mse)
    buffers = dict(grad_student_logits=torch.empty_like(args.student_logits),
                   grad_student_hidden=torch.empty_like(args.student_hidden))
    torch.library.opcheck(OPS.triple_loss_out.default, args, buffers)


# The compiled functions take only the tensors: their scalars are constants of the graph.
def python_api(*inputs):
    out = fastdistil.triple_loss(*inputs, temperature=TEMPERATURE)
    return out.loss * 1.7, out.loss_ce, out.loss_mlm, out.loss_cos


def raw_op(*inputs):
    loss, ce, mlm, cos = OPS.triple_loss(*TripleLossArgs(*inputs, temperature=TEMPERATURE))
    return loss * 1.7, ce, mlm, cos


def terms_and_grads(fn, inputs):
    terms = fn(*tensors(inputs))
    grads = torch.autograd.grad(terms[0], (inputs.student_logits, inputs.student_hidden))
    return [t.detach() for t in terms] + list(grads)


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("fn", [python_api, raw_op], ids=lambda f: f.__name__)
def test_compile_fullgraph_matches_eager(fn, device):
    """On CUDA the compiled graph holds the Triton kernels themselves (kernels/triple_loss.py's tracing rule)."""
    inputs = on_device(make_inputs((2, 5), 37, dim=8, label_frac=0.3), device)
    compiled = terms_and_grads(torch.compile(fn, fullgraph=True, dynamic=False), inputs)
    eager = terms_and_grads(fn, inputs)
    assert eager[4].abs().sum() > 0
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# What the Triton kernels write; a graph that clones anything else was traced with a broken kernel analysis.
KERNEL_OUTPUTS = {"grad_ptr", "kl_rows_ptr", "ce_rows_ptr", "cos_rows_ptr"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_graph_on_cuda_holds_the_kernels_or_the_opaque_op():
    """The graphs AOTAutograd hands Inductor show what traced_compile_unsupported decided: the Triton kernels,
    none of them cloning an input it only reads (with a broken analysis, pytorch#170049, every input is cloned
    or Inductor drops the kernel as dead code, #170808), or the op kept whole. Either way, compiled equals
    eager."""
    from torch._dynamo.backends.common import aot_autograd

    from fastdistil.kernels.triple_loss import traced_compile_unsupported

    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module.graph)
        return graph_module.forward

    inputs = on_device(make_inputs((2, 5), 37, dim=8, label_frac=0.3), "cuda")
    torch._dynamo.reset()
    compiled = terms_and_grads(torch.compile(raw_op, fullgraph=True, backend=aot_autograd(
        fw_compiler=capture, bw_compiler=capture)), inputs)
    nodes = [node for graph in graphs for node in graph.nodes]
    kernels = [n for n in nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    opaque = [n for n in nodes if n.target is OPS._triple_loss_forward.default]
    why = traced_compile_unsupported()
    print(f"torch.compile: {why or 'traces the Triton kernels'}")
    if why is None:
        assert len(kernels) >= 2 and not opaque, [str(n.target) for n in nodes]
        for node in kernels:
            assert set(node.kwargs["tensors_to_clone"]) <= KERNEL_OUTPUTS, node.kwargs["tensors_to_clone"]
    else:
        assert opaque and not kernels, [str(n.target) for n in nodes]
    for a, b in zip(compiled, terms_and_grads(raw_op, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- without the compiled extension ---

REPO = Path(__file__).resolve().parents[1]
NO_EXTENSION = textwrap.dedent("""
    import sys, warnings
    import torch
    sys.modules["fastdistil._C"] = None  # import fails, as with a torch the extension was not built against
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastdistil
    from helpers import make_inputs
    inputs = make_inputs((3, 5), 37, dim=8, label_frac=0.3)
    out = fastdistil.triple_loss(*inputs._replace(temperature=1.5), backend="auto")
    (out.loss * 1.7).backward()
    try:
        fastdistil.triple_loss(*inputs, backend="cpp")
        cpp_error = None
    except RuntimeError as exc:
        cpp_error = str(exc)
    torch.save(dict(warnings=[(w.category.__name__, str(w.message)) for w in caught],
                    terms=[t.detach() for t in out], grads=[inputs.student_logits.grad, inputs.student_hidden.grad],
                    cpp_error=cpp_error, has_ops=hasattr(torch.ops.fastdistil, "triple_loss")), sys.argv[1])
""")


def run_without_extension(tmp_path, require):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
               FASTDISTIL_REQUIRE_EXTENSION=require)
    return subprocess.run([sys.executable, "-c", NO_EXTENSION, str(tmp_path / "out.pt")], env=env,
                          capture_output=True, text=True, timeout=120)


def test_missing_extension_warns_and_falls_back_to_reference(tmp_path):
    proc = run_without_extension(tmp_path, "0")
    assert proc.returncode == 0, proc.stderr
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    warnings = [message for category, message in result["warnings"] if category == "RuntimeWarning"]
    assert any("fastdistil._C" in m and "pip install" in m and "FASTDISTIL_REQUIRE_EXTENSION" in m
               for m in warnings), result["warnings"]
    assert "pip install" in result["cpp_error"]
    assert not result["has_ops"]
    inputs = make_inputs((3, 5), 37, dim=8, label_frac=0.3)
    terms, grads = loss_and_grads(fastdistil.triple_loss_reference, inputs, temperature=1.5)
    for a, b in zip(result["terms"] + result["grads"], terms + grads):
        assert torch.equal(a, b)


def test_required_extension_missing_is_an_import_error(tmp_path):
    proc = run_without_extension(tmp_path, "1")
    assert proc.returncode != 0
    assert "ImportError: fastdistil: the C++ extension fastdistil._C failed to load" in proc.stderr


def test_auto_on_a_gpu_whose_triton_kernels_failed_to_import_runs_the_reference(monkeypatch):
    """backend="auto" must not pick the Triton kernel when its module failed to import (the op's CUDA kernel is
    then never registered, and the call would end in the dispatcher's NotImplementedError): the reference,
    with the import error as the reason, which python -m fastdistil.env prints too."""
    from fastdistil import env

    module = sys.modules["fastdistil.ops.triple_loss"]  # the package's triple_loss attribute is the function
    monkeypatch.setitem(sys.modules, "fastdistil.kernels.triple_loss", None)  # importing it raises ImportError
    for name in ("triton_kernels_error", "_register_triton_kernels"):  # decided afresh, for this test only
        monkeypatch.setattr(module, name, functools.cache(getattr(module, name).__wrapped__))
    monkeypatch.setattr(env, "triton_kernels_error", module.triton_kernels_error)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    backend, why = module.auto_backend(torch.device("cuda"), torch.float16)
    assert backend == "reference" and "the Triton kernels failed to import (ModuleNotFoundError" in why, why
    assert env.triple_loss_backend(torch.device("cuda"), torch.float16)[0] == "unfused reference"
    assert env.fused_linear_backend(torch.device("cuda"), torch.float16)[0] == "unavailable"
    assert env.compile_mode().startswith("no Triton kernels to compile")
