"""The notebook's subject path: instance images + trigger token + class prompt -> prior preservation."""

from __future__ import annotations

import pytest

from sd35hub.errors import ConfigError
from sd35hub.frontends import colab as nb


def test_class_prompt_turns_on_prior_preservation_in_the_plan():
    plan = nb.build_plan(model="tiny", dataset="sample", trigger_word="sks shape", class_prompt="a photo of a shape",
                         num_class_images=12)
    assert plan.config.data.class_prompt == "a photo of a shape" and plan.config.data.num_class_images == 12
    assert nb.build_plan(model="tiny", dataset="sample").config.data.class_prompt == ""  # off by default
    with pytest.raises(ConfigError, match="contains the trigger word"):
        nb.build_plan(model="tiny", dataset="sample", trigger_word="sks", class_prompt="a photo of sks")
