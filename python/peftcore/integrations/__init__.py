"""Integrations with training frameworks.

``peftcore.integrations.transformers.PeftcoreCallback``: a ``transformers.TrainerCallback`` that writes each
checkpoint's adapter with :func:`peftcore.save_adapter` and runs sparse delta's drop-and-grow
(``SparseDeltaScheduler``) inside ``Trainer``, resuming its step count from a checkpoint. See docs/distributed.md.
"""
