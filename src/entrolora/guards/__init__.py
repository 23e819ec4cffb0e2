"""One guard per kind of input, each at the one place that kind passes through (docs/refusals.md).

- ``output``: everything the program writes (run, demo, export, merged and report folders,
  ``el.save``, statistics and plan files): resolved paths, the files an overwrite would delete,
  outputs it does not own, writability and room, checked before any work.
- ``values``: fields of the files the program reads (plans, statistics, metrics): types,
  finiteness, ranges, one line naming the file, the field and the allowed range.
- ``api``: the public API's argument types, one line each (``plans.need_plan`` and
  ``planners.need_stats_or_model`` check the two entrolora types with its helpers).
- ``quote``: every user value in generated text (model cards, reports, snippets) quoted for
  the language it lands in.

Data tables are guarded where they are parsed (``data/tables.read_table``,
``data/datasets.load_data``); the recorded-value rule (nothing recorded that differs from what was
used) lives with the options
(``job/config.validate_config``, ``flex/schedule.py``); the memory guard with the adapters
(``adapters/memory.py``: what an adapter or a FlexLoRA capacity will take, checked before
``apply`` allocates). This package imports nothing of entrolora above ``files``, so every stage
may use it.
"""
