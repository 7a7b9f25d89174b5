"""lorabook.config: one switch for the run setting, one place for device and dtype."""

import pytest
import torch

from lorabook import config


def test_mode_from_environment(monkeypatch):
    monkeypatch.setenv(config.MODE_ENV, "fast")
    assert config.get_settings().mode == "fast"
    monkeypatch.setenv(config.MODE_ENV, " CPU ")
    assert config.get_settings().mode == "cpu"


def test_default_mode_follows_the_device(monkeypatch):
    monkeypatch.delenv(config.MODE_ENV, raising=False)
    assert config.get_settings().mode == ("gpu" if torch.cuda.is_available() else "cpu")


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(config.MODE_ENV, "turbo")
    with pytest.raises(ValueError, match="expected one of"):
        config.get_settings()


def test_fast_does_less_work_than_cpu_than_gpu():
    fast, cpu, gpu = (config.get_settings(m) for m in ("fast", "cpu", "gpu"))
    for field in ("train_steps", "n_train", "n_eval", "encoder_steps", "latency_repeats"):
        assert getattr(fast, field) < getattr(cpu, field) < getattr(gpu, field), field


def test_describe_names_device_dtype_and_setting():
    info = config.describe()
    assert info["device"] == str(config.get_device())
    assert info["dtype"] in ("float32", "bfloat16")
    assert info["setting.mode"] in config.MODES
    import peft
    import transformers

    assert (info["peft"], info["transformers"]) == (peft.__version__, transformers.__version__)
    if not torch.cuda.is_available():
        assert config.get_dtype() == torch.float32


def test_seed_everything_repeats_random_draws():
    config.seed_everything(3)
    a = torch.randn(4)
    config.seed_everything(3)
    assert torch.equal(a, torch.randn(4))


def test_the_record_setting_trains_to_convergence_on_200_or_more_test_messages():
    record, cpu = config.get_settings("record"), config.get_settings("cpu")
    assert record.n_eval >= 200 and record.seeds >= 3
    assert record.train_steps * record.batch_size > 10 * cpu.train_steps * cpu.batch_size
