"""A service's [<service>] table in the CLINISYNTH_CONFIG file carries its service-specific
settings too (what CLINISYNTH_<SERVICE>_<KEY> carries), and the environment wins over it."""

from __future__ import annotations

import pathlib

from clinisynth_server.runtime.config import load_config


def test_service_table_settings_reach_the_service(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "clinisynth.toml"
    cfg.write_text(
        'store_url = "/srv/store"\n\n'
        "[generator]\ngeneration_slots = 2\nworkers = 6\nreward_filter = true\n"
        'raters = ["dr_a", "dr_b"]\n\n'
        "[finetune]\nnproc_per_node = 4\n"
    )
    config = load_config("generator", env={"CLINISYNTH_CONFIG": str(cfg)})
    assert config.get("generation_slots") == "2"
    assert config.get("reward_filter") == "true" and config.get("raters") == "dr_a,dr_b"
    assert config.workers == 6 and config.store_url == "/srv/store"
    assert config.get("nproc_per_node") == ""  # another service's table stays there


def test_environment_wins_over_the_file(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "clinisynth.toml"
    cfg.write_text("[generator]\ngeneration_slots = 2\n")
    env = {"CLINISYNTH_CONFIG": str(cfg), "CLINISYNTH_GENERATOR_GENERATION_SLOTS": "5"}
    assert load_config("generator", env=env).get("generation_slots") == "5"
