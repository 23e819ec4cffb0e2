"""Integrations with training frameworks (import the submodule you need; each imports its
framework, e.g. ``from entrolora.integrations.transformers import EntroloraCallback``)."""
