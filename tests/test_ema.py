"""train.ema_decay: final/ holds the moving average of the weights, computed by hand here; training itself is
unchanged by it; a killed and resumed run averages exactly as an uninterrupted one."""

import pytest
import torch
from safetensors.torch import load_file

from diffusion_dpo.errors import UserError
from diffusion_dpo.training import train

from test_training import make_cfg, read_metrics, straight_and_resumed, unet_weights

LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from diffusion_dpo.testing.tiny_data import build_tiny_pickapic

    return build_tiny_pickapic(tmp_path_factory.mktemp("data") / "pickapic", num_pairs=24, seed=1)


def weights(path, rank: int) -> dict[str, torch.Tensor]:
    """The trainable weights a checkpoint or final/ holds (the whole UNet, or the LoRA adapters)."""
    return load_file(path / LORA_FILE) if rank else unet_weights(path)


@pytest.mark.parametrize("rank", [0, 4])
def test_final_holds_the_hand_computed_average_and_training_is_unchanged(tmp_path, tiny_sd, tiny_data, rank):
    """Four updates at decay 0.2: d_1 = 0, d_2 = 2/11 (the cap n/(n+9) binds), d_3 = d_4 = 0.2. θ_1..θ_3 are a
    plain run's checkpoints and θ_4 its final/; the averaged run's final/ is the average of those, its checkpoints
    and losses are the plain run's."""
    common = dict(train__max_steps=4, train__checkpointing_steps=1, lora__rank=rank, data__batch_size=3)
    plain = train(make_cfg(tmp_path / "plain", tiny_sd, tiny_data, **common))
    averaged = train(make_cfg(tmp_path / "ema", tiny_sd, tiny_data, train__ema_decay=0.2, **common))

    thetas = [weights(tmp_path / "plain" / f"checkpoint-{n}", rank) for n in (1, 2, 3)] + [weights(plain, rank)]
    by_hand = {k: v.double() for k, v in thetas[0].items()}  # d_1 = 0: the first update replaces the average
    for n, theta in enumerate(thetas[1:], start=2):
        d = min(0.2, n / (n + 9))
        by_hand = {k: d * by_hand[k] + (1 - d) * theta[k].double() for k in by_hand}
    got = weights(averaged, rank)
    assert got.keys() == by_hand.keys()
    assert all(torch.allclose(got[k].double(), by_hand[k], rtol=0, atol=1e-6) for k in got)
    assert any(not torch.equal(got[k], thetas[-1][k]) for k in got)  # the average is not the last weights
    for n in (1, 2, 3):  # checkpoints keep the weights training continues from, as without the average
        a, b = (weights(tmp_path / run / f"checkpoint-{n}", rank) for run in ("plain", "ema"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "ema" / "checkpoint-3" / "ema.safetensors").is_file()
    assert [m["loss"] for m in read_metrics(tmp_path / "plain")] == [m["loss"] for m in read_metrics(tmp_path / "ema")]
    assert "moving average" in (averaged / "README.md").read_text()


@pytest.mark.parametrize("rank", [0, 4])
def test_a_resumed_run_averages_exactly_as_an_uninterrupted_one(tmp_path, tiny_sd, tiny_data, rank):
    """Killed after step 3 (checkpoint at 2), resumed: final/ (the average) equal bit for bit."""
    common = dict(train__max_steps=5, train__checkpointing_steps=2, lora__rank=rank, data__batch_size=3,
                  train__ema_decay=0.5)
    straight, resumed = straight_and_resumed(tmp_path, tiny_sd, tiny_data, **common)
    a, b = weights(straight, rank), weights(resumed, rank)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_an_average_from_a_checkpoint_without_one_is_one_clear_error(tmp_path, tiny_sd, tiny_data):
    common = dict(train__max_steps=3, train__checkpointing_steps=2)
    train(make_cfg(tmp_path / "run", tiny_sd, tiny_data, **common))
    with pytest.raises(UserError, match="holds no weight average .*train.ema_decay"):
        train(make_cfg(tmp_path / "run", tiny_sd, tiny_data, train__resume=str(tmp_path / "run" / "checkpoint-2"),
                       train__ema_decay=0.9, **common))

