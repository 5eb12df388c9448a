"""The knobs the training guides tell users to turn, each shown to take effect on the tiny SDXL: max-norm
regularisation (scale_weight_norms) keeps every LoRA module's norm at the limit, weight decay shrinks a weight with no
gradient by 1 - lr x decay, Prodigy's d_coef scales its step-size estimate, the pyramid discount changes the noise's
low-frequency share, LoRA dropout changes what trains; settings that cannot work (or would do nothing) are refused in
one line naming the input before anything trains; train() records them in training_config.json."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from pti.training.max_norm import apply_max_norm, delta_norm, lora_layers
from pti.training.trainer import SampleKey, SettingsError, Trainer, TrainingSettings
from training_fixtures import SIZE, single_torch_thread, write_dataset_folder, write_photo_zip

CAPTIONS = ["a photo of TOK", "TOK sitting on a table", "a close up photo of TOK", "TOK in the forest"]
# kohya's recommended limit. Without regularisation these settings (lora_lr 3e-2, 3 steps, rank 4) leave the 64 LoRA
# modules with norms of 2.04 on average and 2.97 at most (measured), so the limit binds.
NORM_LIMIT = 1.0
# The scaled factors are float32: their product's norm lands on the limit up to float32 rounding of two
# multiplications and the norm itself (a few 1e-7 relative); 1e-5 leaves room without hiding a missed module.
NORM_RTOL = 1e-5

one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)


def make_settings(dataset: Path, output: Path, **overrides) -> TrainingSettings:
    values = dict(dataset_dir=dataset, output_dir=output, resolution=SIZE, train_batch_size=2, max_train_steps=3,
                  lora_rank=4, lora_lr=3e-2, ti_lr=1e-2, ti_frac=0.0, lr_warmup_steps=0,
                  validation_num_inference_steps=1, show_progress=False, seed=7)
    values.update(overrides)
    return TrainingSettings(**values)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset_folder(tmp_path_factory.mktemp("data") / "dataset", CAPTIONS)


def trained(dataset: Path, output: Path, **overrides) -> Trainer:
    trainer = Trainer.create(make_settings(dataset, output, **overrides))
    trainer.run()
    return trainer


def module_norms(trainer: Trainer) -> list[float]:
    return [float(delta_norm(layer)) for layer in lora_layers(trainer.unet)]


def lora_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.unet).items()}


# ------------------------------------------------------------------ scale_weight_norms


def test_max_norm_holds_every_lora_module_at_the_limit(dataset, tmp_path):
    free = trained(dataset, tmp_path / "free")
    limited = trained(dataset, tmp_path / "limited", scale_weight_norms=NORM_LIMIT)
    assert max(module_norms(free)) > 2 * NORM_LIMIT, "the limit would not bind; raise lora_lr or lower NORM_LIMIT"
    norms = module_norms(limited)
    assert max(norms) <= NORM_LIMIT * (1 + NORM_RTOL)
    stats = limited.norm_stats
    assert stats.keys_scaled > 0 and stats.max_norm <= NORM_LIMIT * (1 + NORM_RTOL)
    assert stats.mean_norm == pytest.approx(sum(norms) / len(norms), rel=NORM_RTOL)
    assert limited.training_config()["lora_norms"]["keys_scaled"] == stats.keys_scaled
    assert free.norm_stats is None and free.training_config()["lora_norms"] is None


def test_max_norm_scales_a_long_module_to_the_limit_and_leaves_short_ones():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Conv2d(8, 8, 3), torch.nn.Linear(8, 8))
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1", "2"]), model)
    layers = lora_layers(model)
    for layer, size in zip(layers, (1.0, 1.0, 1e-3)):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=size)
    before = [float(delta_norm(layer)) for layer in layers]
    with torch.no_grad():
        full = [float(layer.get_delta_weight("default").double().norm()) for layer in layers]
    # the rank x rank shortcut is the full matrix's norm (PEFT forms the matrix in float32: 1e-6 relative)
    assert before == pytest.approx(full, rel=1e-6)
    stats = apply_max_norm(model, 0.5)
    after = [float(delta_norm(layer)) for layer in layers]
    assert before[0] > 0.5 and before[1] > 0.5 and before[2] < 0.5
    assert after[:2] == pytest.approx([0.5, 0.5], rel=NORM_RTOL) and after[2] == before[2]
    assert stats.keys_scaled == 2 and stats.max_norm == pytest.approx(0.5)


# ------------------------------------------------------------------ weight decay, d_coef, dropout, pyramid discount


def test_weight_decay_shrinks_a_weight_without_gradient_by_lr_times_decay(dataset, tmp_path):
    trainer = Trainer.create(make_settings(dataset, tmp_path / "out", ti_weight_decay=0.1, lora_weight_decay=0.5))
    trainer.embeddings.set_trainable(True)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    params = {name: [p for p in g["params"]] for name, g in groups.items()}
    before = {name: [p.detach().clone() for p in ps] for name, ps in params.items()}
    for ps in params.values():
        for p in ps:
            p.grad = torch.zeros_like(p)  # Adam's own update of a zero gradient is 0 / eps = 0: only decay acts
    trainer.optimizer.step()
    for name, lr, decay in (("embeddings", 1e-2, 0.1), ("lora", 3e-2, 0.5)):
        for old, new in zip(before[name], params[name]):
            # one float32 multiplication per element: equal within float32 rounding
            torch.testing.assert_close(new.detach(), old * (1 - lr * decay), rtol=1e-6, atol=0)
    assert any(p.abs().max() > 0 for p in before["lora"]), "the LoRA down weights are non-zero, so decay shows"


def test_d_coef_scales_prodigys_step_size_estimate(dataset, tmp_path):
    estimates = {}
    for d_coef in (1.0, 2.0):
        trainer = trained(dataset, tmp_path / f"d{d_coef}", optimizer="prodigy", prodigy_d_coef=d_coef,
                          max_train_steps=2)
        estimates[d_coef] = trainer.optimizer.param_groups[0]["d_hat"]
    # Prodigy's first estimate is 0 (nothing has moved yet), so both runs take step 1 with the same initial d and
    # see the same gradients at step 2, whose estimate is d_coef x (a ratio of sums of them): exactly twice, up to
    # the rounding of one multiplication.
    assert estimates[1.0] > 0 and estimates[2.0] == pytest.approx(2 * estimates[1.0], rel=1e-6)


def test_lora_dropout_changes_what_trains_under_the_same_seed(dataset, tmp_path):
    plain = lora_state(trained(dataset, tmp_path / "plain", max_train_steps=2))
    again = lora_state(trained(dataset, tmp_path / "again", max_train_steps=2))
    dropped = lora_state(trained(dataset, tmp_path / "dropped", max_train_steps=2, lora_dropout=0.5))
    assert all(torch.equal(plain[k], again[k]) for k in plain), "same seed, same kernels: the same weights"
    changed = [k for k in plain if "lora_B" in k and not torch.allclose(plain[k], dropped[k], rtol=1e-3, atol=1e-6)]
    assert len(changed) > len([k for k in plain if "lora_B" in k]) // 2, "dropout moved most up weights"


def pooled_noise_variance(trainer: Trainer) -> float:
    """Variance of 8x8 block means of the training noise (white noise: 1/64): the low-frequency share."""
    noise = torch.cat([trainer._sample_noise(SampleKey(7, 0, slot, SampleKey.INSTANCE), (4, 64, 64))[0]
                       for slot in range(16)])
    return F.avg_pool2d(noise, 8).var().item()


def test_pyramid_discount_changes_the_low_frequency_share_of_the_noise(dataset, tmp_path):
    variances = {}
    for discount in (0.1, 0.8):
        trainer = Trainer.create(make_settings(dataset, tmp_path / f"p{discount}", pyramid_noise_iterations=4,
                                               pyramid_noise_discount=discount))
        variances[discount] = pooled_noise_variance(trainer)
    # measured: 0.0159 at discount 0.1 (white noise: 1/64 = 0.0156), 0.179 at 0.8
    assert variances[0.8] > 4 * variances[0.1]


# ------------------------------------------------------------------ refusals


BAD_KNOBS = [
    (dict(min_snr_gamma=-1.0), "min_snr_gamma must be positive"),
    (dict(pyramid_noise_discount=0.5), "pyramid_noise_discount needs pyramid_noise_iterations"),
    (dict(pyramid_noise_iterations=2, pyramid_noise_discount=1.5), "pyramid_noise_discount must be above 0"),
    (dict(pyramid_noise_iterations=11), "pyramid_noise_iterations must be at most 10"),
    (dict(prodigy_d_coef=2.0), "prodigy_d_coef only applies to optimizer=prodigy"),
    (dict(optimizer="prodigy", prodigy_d_coef=0.0), "prodigy_d_coef must be above 0"),
    (dict(lora_weight_decay=-0.1), "lora_weight_decay must be between 0 and 1"),
    (dict(ti_weight_decay=2.0), "ti_weight_decay must be between 0 and 1"),
    (dict(noise_offset=3.0), "noise_offset must be between 0 and 1"),
    (dict(lora_dropout=1.0), "lora_dropout must be at least 0 and below 1"),
    (dict(scale_weight_norms=-1.0), "scale_weight_norms must be positive"),
    (dict(scale_weight_norms=1.0, use_dora=True), "scale_weight_norms does not apply to DoRA"),
    (dict(scale_weight_norms=1.0, is_lora=False), "scale_weight_norms limits LoRA weights; it needs is_lora=true"),
]


@pytest.fixture(scope="module")
def photos_zip(tmp_path_factory) -> Path:
    return write_photo_zip(tmp_path_factory.mktemp("photos"), 3, size=96)


@pytest.mark.parametrize("inputs, message", BAD_KNOBS)
def test_bad_knobs_are_refused_by_train_before_preprocessing(photos_zip, monkeypatch, inputs, message):
    import preprocess
    import train
    from pti.training.failures import RunFailed

    def no_preprocessing(*args, **kwargs):
        raise AssertionError("preprocessing started before the settings were checked")

    monkeypatch.setattr(preprocess, "preprocess", no_preprocessing)
    with pytest.raises(RunFailed, match=message) as info:
        train.train(input_images=photos_zip, verbose=False, **inputs)
    assert "\n" not in str(info.value)


def test_min_snr_is_refused_for_a_model_it_is_not_defined_for(dataset, tmp_path, monkeypatch):
    from pti.training import trainer as trainer_module

    real = trainer_module._training_noise_scheduler

    def sample_predicting(scheduler):
        noise_scheduler = real(scheduler)
        noise_scheduler.register_to_config(prediction_type="sample")
        return noise_scheduler

    monkeypatch.setattr(trainer_module, "_training_noise_scheduler", sample_predicting)
    with pytest.raises(SettingsError, match="min_snr_gamma works with epsilon or v_prediction") as info:
        Trainer.create(make_settings(dataset, tmp_path / "out", min_snr_gamma=5.0))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ through train(): recorded, and in the file


def test_train_records_the_knobs_and_its_lora_file_keeps_the_norm_limit(photos_zip, tmp_path):
    import train

    output = train.train(input_images=photos_zip, seed=7, resolution=SIZE, train_batch_size=1, max_train_steps=3,
                         lora_rank=4, lora_lr=3e-2, lr_warmup_steps=0, captioning_model="",
                         crop_based_on_salience=False, verbose=False, validation_num_inference_steps=1,
                         save_precision="fp32", scale_weight_norms=NORM_LIMIT, lora_dropout=0.1,
                         ti_weight_decay=0.01, lora_weight_decay=0.05, pyramid_noise_iterations=3,
                         pyramid_noise_discount=0.5, min_snr_gamma=5.0)
    folder = tmp_path / "unpacked"
    with tarfile.open(Path(output.weights)) as tar:
        tar.extractall(folder, filter="data")
    config = json.loads((folder / "training_config.json").read_text())
    settings = config["settings"]
    assert {k: settings[k] for k in ("scale_weight_norms", "lora_dropout", "ti_weight_decay", "lora_weight_decay",
                                     "pyramid_noise_iterations", "pyramid_noise_discount", "min_snr_gamma",
                                     "prodigy_d_coef")} == {
        "scale_weight_norms": NORM_LIMIT, "lora_dropout": 0.1, "ti_weight_decay": 0.01, "lora_weight_decay": 0.05,
        "pyramid_noise_iterations": 3, "pyramid_noise_discount": 0.5, "min_snr_gamma": 5.0, "prodigy_d_coef": 1.0}
    assert config["lora_norms"]["keys_scaled"] > 0
    assert config["lora_norms"]["max_norm"] <= NORM_LIMIT * (1 + NORM_RTOL)
    weights = load_file(folder / "pytorch_lora_weights.safetensors")
    with safe_open(folder / "pytorch_lora_weights.safetensors", "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    adapter = {key.removeprefix("unet."): value for key, value in metadata.items()}
    scale = adapter["lora_alpha"] / adapter["r"]
    norms = [float((weights[key.replace("lora_A", "lora_B")].double() @ weights[key].double()).norm()) * scale
             for key in weights if "lora_A" in key]
    assert norms and max(norms) <= NORM_LIMIT * (1 + NORM_RTOL)


def test_train_passes_prodigy_d_coef_to_the_settings(tmp_path):
    import inspect

    import train

    defaults = {name: p.default.default for name, p in inspect.signature(train.train).parameters.items()}
    settings = train._training_settings({**defaults, "optimizer": "prodigy", "prodigy_d_coef": 2.0}, tmp_path)
    assert (settings.optimizer, settings.prodigy_d_coef, settings.scale_weight_norms) == ("prodigy", 2.0, None)
