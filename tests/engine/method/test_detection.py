"""The flag rule: thresholds from the calibration split at a false-positive rate."""

from __future__ import annotations

import pytest
import torch

from apudae_engine.backends.purifier import Purifier
from apudae_engine.core.errors import UserError
from apudae_engine.method.config import PurifyConfig
from apudae_engine.method.detection import flag_threshold, fpr_table


def _calibration(errors: torch.Tensor) -> dict:
    return {"mu": float(errors.mean()), "sigma": float(errors.std()), "flag_fpr": 0.05,
            "fpr_thresholds": fpr_table(errors)}


def test_the_threshold_at_a_rate_flags_that_share_of_clean_images():
    clean = torch.rand(20_000, generator=torch.Generator().manual_seed(0)) * 10
    cal = _calibration(clean)
    for fpr in (0.01, 0.05, 0.1, 0.045, 0.25):  # table entries and interpolated rates
        t = flag_threshold(cal, fpr)
        assert (clean > t).double().mean().item() == pytest.approx(fpr, abs=0.003)
    assert flag_threshold(cal) == flag_threshold(cal, 0.05)  # the record's default


def test_flag_k_is_the_mu_k_sigma_rule_and_old_records_fall_back_to_k3():
    cal = {"mu": 2.0, "sigma": 0.5}
    assert flag_threshold(cal) == pytest.approx(3.5)
    assert flag_threshold({**_calibration(torch.arange(100.0)), "mu": 2.0, "sigma": 0.5},
                          flag_k=1.0) == pytest.approx(2.5)
    assert flag_threshold({}) is None
    with pytest.raises(UserError, match="rerun `apudae-engine calibrate`"):
        flag_threshold(cal, 0.05)


def test_rates_outside_the_table_are_refused():
    cal = _calibration(torch.arange(1000.0))
    with pytest.raises(UserError, match="outside the calibrated range"):
        flag_threshold(cal, 0.9)


def test_bundled_model_flags_at_five_percent_by_default():
    purifier = Purifier.from_pretrained("fmnist")
    cal = purifier.checkpoint.calibration
    assert purifier.flag_threshold() == pytest.approx(cal["fpr_thresholds"]["0.05"])
    # Above mu + sigma, below the old mu + 3 sigma rule, which flagged about 1.5 % of clean data.
    assert cal["mu"] + cal["sigma"] < purifier.flag_threshold() < cal["mu"] + 3 * cal["sigma"]
    stricter = Purifier.from_pretrained("fmnist", PurifyConfig(seed=0, flag_fpr=0.01))
    assert stricter.flag_threshold() == pytest.approx(cal["fpr_thresholds"]["0.01"])
    legacy = Purifier.from_pretrained("fmnist", PurifyConfig(seed=0, flag_k=3.0))
    assert legacy.flag_threshold() == pytest.approx(cal["mu"] + 3 * cal["sigma"])


def test_config_refuses_both_rules_and_bad_rates():
    with pytest.raises(ValueError, match="not both"):
        PurifyConfig(seed=0, flag_fpr=0.05, flag_k=3.0)
    with pytest.raises(ValueError, match="flag_fpr"):
        PurifyConfig(seed=0, flag_fpr=1.5)
