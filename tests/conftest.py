"""Shared fixtures: tiny SD, SDXL, SD3 and FLUX pipelines saved as real diffusers directories, built once."""

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
