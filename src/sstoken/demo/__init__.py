"""The demo shipped with sstoken: the recipe ``sstoken train`` runs without ``--config``, and its data."""

from pathlib import Path

DEMO_RECIPE = Path(__file__).with_name("demo.yaml")
DEMO_DATA = Path(__file__).with_name("demo.jsonl")
