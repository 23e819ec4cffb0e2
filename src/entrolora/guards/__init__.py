"""One guard per kind of input, each at the one place that kind passes through (docs/refusals.md).

- ``output``: everything the program writes (run, demo, export, merged and report folders,
  ``el.save``, statistics and plan files): resolved paths, the files an overwrite would delete,
  outputs it does not own, writability and room, checked before any work.
- ``values``: fields of the files the program reads (plans, statistics, metrics): types,
  finiteness, ranges, one line naming the file, the field and the allowed range.
- ``memory``: what an adapter (or a FlexLoRA capacity) will take, checked before allocating.
- ``api``: the public API's argument types, one line each.
- ``quote``: every user value in generated text (model cards, reports, snippets) quoted for
  the language it lands in.

Data tables are guarded where they are parsed (``tables.read_table``, ``data.load_data``); the
recorded-value rule (nothing recorded that differs from what was used) lives with the options
(``job/config.validate_config``, ``flex_schedule``).
"""
