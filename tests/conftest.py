"""Shared fixtures: a tiny pipeline of every family, saved as a real diffusers directory and built once; the family
lists the cross-family tests loop over."""

import os
import tempfile
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# remembered image checks (data/image_checks.py) go to a folder of this session, not the user's ~/.cache
os.environ["DIFFUSION_DPO_CACHE"] = tempfile.mkdtemp(prefix="dpo-tests-cache-")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*torchvision.*")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two test workers on two cores: one thread each, or they thrash
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _families():
    from diffusion_dpo.models import FAMILIES
    from diffusion_dpo.models.flow import FlowMatching

    return tuple(f.name for f in FAMILIES), tuple(f.name for f in FAMILIES if issubclass(f, FlowMatching))


# The cross-family tests loop over the families the library trains (models.loading.FAMILIES), not over a list of
# their own: a family added there is in every such test at once, and fails them until it has its tiny fixture
# (`tiny_<name>`) and its entries in the tests' per-family tables.
ALL_FAMILIES, FLOW_FAMILIES = _families()


def family_fixture(family: str) -> str:
    """The session fixture of a family's tiny pipeline: tiny_sd, tiny_flux2_klein, ..."""
    return "tiny_" + family.replace("-", "_")


def tiny_family(request, family: str):
    """The tiny pipeline directory of the family named `family` (its `tiny_<name>` fixture)."""
    return request.getfixturevalue(family_fixture(family))


def _tiny(tmp_path_factory, name: str, **kwargs):
    from diffusion_dpo.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / name, **kwargs)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return _tiny(tmp_path_factory, "sd", kind="sd")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return _tiny(tmp_path_factory, "sdxl", kind="sdxl")


@pytest.fixture(scope="session")
def tiny_sd_vpred(tmp_path_factory):
    return _tiny(tmp_path_factory, "sd_v", kind="sd", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return _tiny(tmp_path_factory, "sd3", kind="sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return _tiny(tmp_path_factory, "flux", kind="flux")


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory):
    return _tiny(tmp_path_factory, "flux_schnell", kind="flux-schnell")


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory):
    return _tiny(tmp_path_factory, "zimage", kind="zimage")


@pytest.fixture(scope="session")
def tiny_flux2_klein(tmp_path_factory):
    return _tiny(tmp_path_factory, "flux2_klein", kind="flux2-klein")


@pytest.fixture(scope="session")
def tiny_flux2(tmp_path_factory):
    return _tiny(tmp_path_factory, "flux2", kind="flux2")


@pytest.fixture(scope="session")
def tiny_qwenimage(tmp_path_factory):
    return _tiny(tmp_path_factory, "qwenimage", kind="qwenimage")
