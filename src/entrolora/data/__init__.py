"""What the job reads: user tables (``tables``: CSV/TSV, JSON Lines, Parquet), user files
(``reading``: JSON and safetensors, each failure one line naming the file), and the data sets
with their splits and batches, the embedded defaults included (``datasets``).

It imports nothing else of entrolora, so every stage may read files through it.
"""
