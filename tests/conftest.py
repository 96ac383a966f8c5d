import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The tiny LLaVA-OV that most model tests convert, and its dense and sparse (`TINY_LAYOUT`) VISOR copies.
@pytest.fixture(scope="module")
def llava():
    from visor_hf.testing import tiny_llava

    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def dense(llava):
    from visor_hf.testing import visor_from_llava

    return visor_from_llava(llava)


@pytest.fixture(scope="module")
def visor(llava):
    from visor_hf.testing import TINY_LAYOUT, visor_from_llava

    return visor_from_llava(llava, **TINY_LAYOUT)
