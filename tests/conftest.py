import os

import torch

# Triton picks interpreter or compiler mode when it is first imported, and other tests' imports (transformers,
# torch.compile) may import it before the Triton tests run: without a GPU, ask for the interpreter up front.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Derandomized so that CI sees the same examples every run; `--hypothesis-profile=explore` searches.
settings.register_profile("default", max_examples=30, deadline=None, derandomize=True, database=None)
settings.register_profile("explore", max_examples=500, deadline=None)
settings.load_profile("default")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def cpu_isa(request):
    """Forces the kernel onto request.param's ISA for one test and restores the automatic choice after."""
    from fastdistil import _C

    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa("auto")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny random 4-layer BERT masked LM with the bert-base-uncased vocabulary, saved with its tokenizer."""
    from training_runs import model_dir

    return model_dir(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """300 documents of the bundled Wikipedia sample as a .txt file."""
    from training_runs import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.txt")


def _family_dir(path, family):
    """A tiny random teacher of the family saved beside its byte-level tokenizer (tests/helpers.py)."""
    from helpers import byte_level_tokenizer, tiny_teacher

    tiny_teacher(family).save_pretrained(path)
    byte_level_tokenizer(family).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT2LMHeadModel with a GPT-2-style byte-level tokenizer."""
    return _family_dir(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="session")
def roberta_dir(tmp_path_factory):
    """A tiny random RobertaForMaskedLM with a RoBERTa-style byte-level tokenizer."""
    return _family_dir(tmp_path_factory.mktemp("roberta"), "roberta")
