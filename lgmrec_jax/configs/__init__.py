"""Configs in the Flax-examples style: one module per dataset with ``get_config()``.

``default.py`` holds every key with the reference's names (SPEC §1.6, §4.5); the dataset modules
change only what the reference's dataset configs change. :func:`for_dataset` picks the module by
dataset name (``synthetic_baby`` uses ``baby``), falling back to ``default``.
"""

import importlib

import ml_collections

DATASET_CONFIGS = ("baby", "sports", "clothing", "tiny")


def config_name(dataset: str) -> str:
    base = dataset.removeprefix("synthetic_")
    return base if base in DATASET_CONFIGS else "default"


def for_dataset(dataset: str) -> ml_collections.ConfigDict:
    module = importlib.import_module(f"lgmrec_jax.configs.{config_name(dataset)}")
    return module.get_config()
