"""Fixtures for the command-line and checkpoint tests."""
import pytest


def shrink_config_(config):
    """OpenFold's config with every stack cut to 1-2 blocks and narrow channels, in place.

    Parameter names follow the same layout as the full model (per-block keys, heads, template
    stack), so checkpoint handling is exercised on the real naming at a fraction of the cost.
    """
    g = config.globals
    g.c_z, g.c_m, g.c_t, g.c_e, g.c_s = 16, 32, 8, 8, 32
    config.model.evoformer_stack.no_blocks = 2
    config.model.extra_msa.extra_msa_stack.no_blocks = 2
    config.model.template.template_pair_stack.no_blocks = 2
    config.model.structure_module.no_blocks = 2
    return config


@pytest.fixture
def shrink_config():
    """The config shrinker above, for tests that build their own model (predict's config_hook)."""
    return shrink_config_


@pytest.fixture
def tiny_model():
    """tiny_model(preset, seed) -> a shrunken AlphaFold (eval mode) with seeded random weights."""
    from openfold.config import model_config
    from openfold.model.model import AlphaFold

    from fastfold_plugin.testing import randomize_parameters_

    def make(preset="model_1_ptm", seed=0):
        model = AlphaFold(shrink_config_(model_config(preset))).eval()
        return randomize_parameters_(model, seed=seed)

    return make


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Random-weight checkpoints go to a per-test cache, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
